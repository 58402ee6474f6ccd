"""PLCReg models: the network and its factory."""
from .factory import build_model, check_compatible, load_model, load_weights, read_weights, save_model
from .plcreg import PLCReg
from .polaca import PoLaCA, PolarityAttention
from .registry import MODELS, default_config, display_name, model_entry, register_model

__all__ = ["PLCReg", "PoLaCA", "PolarityAttention", "build_model", "check_compatible", "load_model",
           "load_weights", "read_weights", "save_model", "MODELS", "default_config", "display_name", "model_entry",
           "register_model"]
