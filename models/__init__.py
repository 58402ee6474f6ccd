"""PLCReg models: the networks, their registry and factory.

Every module of this package is imported here, so a network registers itself (its
``@register_model`` entry) just by being a file in ``models/``.
"""
import importlib
import pkgutil

from .factory import build_model, check_compatible, load_model, load_weights, read_weights, save_model
from .plcreg import PLCReg
from .polaca import PoLaCA, PolarityAttention
from .registry import MODELS, default_config, display_name, model_entry, register_model

__all__ = ["PLCReg", "PoLaCA", "PolarityAttention", "build_model", "check_compatible", "load_model",
           "load_weights", "read_weights", "save_model", "MODELS", "default_config", "display_name", "model_entry",
           "register_model"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
