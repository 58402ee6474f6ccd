"""PLCReg models: the network and its factory."""
from .factory import build_model, check_compatible, load_model, load_weights, read_weights, save_model
from .plcreg import PLCReg
from .polaca import PoLaCA, PolarityAttention

__all__ = ["PLCReg", "PoLaCA", "PolarityAttention", "build_model", "check_compatible", "load_model",
           "load_weights", "read_weights", "save_model"]
