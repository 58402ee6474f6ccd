"""The CPU backend: kernels that compute the reference network's function faster and leaner.

``runner.CpuKernels`` walks a ``PLCReg``'s modules and calls, for each operation, a kernel
that supports that module's settings, or the module itself where none does (another
activation, an affine norm, a padding mode): the reference stays the definition.
``CpuInference`` (no autograd) and ``CpuTraining`` (autograd) are the two tables;
``models/backend.py`` picks one per forward pass.
"""
from .inference import CpuInference
from .training import CpuTraining

__all__ = ["CpuInference", "CpuTraining"]
