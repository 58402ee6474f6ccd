"""Which implementation runs the network: the reference modules, or the CPU kernels.

The modules of ``models/`` state PLCReg once in plain PyTorch; that reference runs on a GPU,
under ``torch.compile``, in float64 and wherever no kernel applies. On the CPU, a forward pass
in float32 (or bf16 autocast on a CPU with native bf16) is run instead by the kernel runner
(``models/kernels``), which walks the same modules' weights with faster, leaner operations and
computes the same function. The choice is made once per forward, here, from the device, grad
mode and precision (as MONAI's ``USE_COMPILED`` or timm's ``use_fused_attn()``):

====================  =========================================================
``PLCREG_KERNELS``    ``auto`` (default): kernels where they apply;
                      ``reference``: the reference modules everywhere
``PLCREG_CPU_BF16``   ``0``: treat this CPU as one without native bf16 (to run
                      the tests as such a CPU would); unset: detect
====================  =========================================================

:func:`use_kernels` sets the first for a block of code.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

KERNELS_ENV = "PLCREG_KERNELS"
CPU_BF16_ENV = "PLCREG_CPU_BF16"
KERNEL_SETTINGS = ("auto", "reference")

_override: list[str] = []


def kernels_setting() -> str:
    """'auto' or 'reference': :func:`use_kernels` if active, else ``PLCREG_KERNELS``."""
    if _override:
        return _override[-1]
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in KERNEL_SETTINGS:
        raise ValueError(f"{KERNELS_ENV}={value!r}: expected one of {KERNEL_SETTINGS}")
    return value


@contextlib.contextmanager
def use_kernels(setting: str):
    """``with use_kernels("reference"):`` runs the reference modules inside the block."""
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"use_kernels: expected one of {KERNEL_SETTINGS}, got {setting!r}")
    _override.append(setting)
    try:
        yield
    finally:
        _override.pop()


@functools.lru_cache(maxsize=None)
def cpuinfo(key: str) -> str:
    """The first value of ``key`` in /proc/cpuinfo ('' where it is missing); read once per key."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def _hardware_bf16() -> bool:
    if not ({"amx_bf16", "avx512_bf16"} & set(cpuinfo("flags").split())) or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 products natively (AMX or AVX-512-bf16) and oneDNN can
    use them; elsewhere bf16 is emulated, slower than float32, and the bf16 kernels cannot run.
    ``PLCREG_CPU_BF16=0`` answers False on any CPU. The one test of this capability: the
    scripts' ``--amp``, the backend choice and the tests' skips all ask it."""
    if os.environ.get(CPU_BF16_ENV, "").strip() == "0":
        return False
    return _hardware_bf16()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type``; None outside autocast and on devices
    that have none (such as "meta")."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def kernel_precision(x: torch.Tensor) -> torch.dtype | None:
    """The precision the CPU kernels would compute a forward pass of input ``x`` in (float32,
    or bf16 under CPU bf16 autocast on a CPU with native bf16), or None where the reference
    runs: another device, float64 input, float16 autocast, emulated bf16, ``torch.compile``
    tracing, PyTorch without oneDNN, or ``PLCREG_KERNELS=reference``."""
    if (kernels_setting() == "reference" or x.device.type != "cpu" or x.dtype != torch.float32
            or torch.compiler.is_compiling() or not torch.backends.mkldnn.is_available()
            or not torch.backends.mkldnn.enabled):
        return None
    amp = autocast_dtype("cpu")
    if amp is None:
        return torch.float32
    if amp == torch.bfloat16 and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def select_kernels(x: torch.Tensor):
    """The kernel table for a forward pass of input ``x`` (inference without autograd, training
    with it), or None for the reference modules."""
    precision = kernel_precision(x)
    if precision is None:
        return None
    from .kernels import CpuInference, CpuTraining
    return CpuTraining(precision) if torch.is_grad_enabled() else CpuInference(precision)


def backend_name(device: torch.device | str, amp: torch.dtype | None = None, training: bool = False) -> str:
    """What a run on ``device`` with autocast ``amp`` executes, for result files:
    'reference', or 'cpu-kernels' (inference) / 'cpu-kernels-training' with '-bf16' where so."""
    if torch.device(device).type != "cpu":
        return "reference"
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        precision = kernel_precision(torch.empty(0))
    if precision is None:
        return "reference"
    name = "cpu-kernels-training" if training else "cpu-kernels"
    return name + ("-bf16" if precision == torch.bfloat16 else "")
