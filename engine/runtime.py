"""Run-time helpers: device choice, seeding, provenance (command and package versions)."""
from __future__ import annotations

import os
import platform
import random
import shlex
import sys
import threading
from importlib import metadata

import numpy as np
import torch

from models.backend import cpu_has_native_bf16, cpuinfo


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an unavailable CUDA request falls back to CPU with a warning."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        _warn_once(f"device {name}", f"warning: device {name!r} requested but CUDA is not available; using the CPU")
        return torch.device("cpu")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "scipy", "nibabel"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv])


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_features() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo 'flags'; empty where unknown)."""
    return set(cpuinfo("flags").split())


def provenance(device=None) -> dict:
    """What every result file records about its run: command, package versions, CPU, device."""
    from .process import huge_pages_state
    out = {"command": command_line(), "versions": package_versions(), "cpu": cpu_name()}
    if huge_pages_state() is not None:
        out["huge_pages"] = huge_pages_state()
    if device is not None:
        out["device"] = str(device)
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def progress_setting(args) -> bool | None:
    """The ``progress`` setting of a command line with ``--no-progress``: False when given, else
    None (automatic: bars on a terminal)."""
    return False if getattr(args, "no_progress", False) else None


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` setting: None (auto: a bar on a terminal), or its negation."""
    return None if progress is None else not progress


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        print(message, file=sys.stderr)
        _warned.add(key)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Autocast dtype for mixed precision, or None for float32.

    CUDA: bf16 where supported, else fp16. CPU: bf16 where the CPU has native bf16
    (``cpu_has_native_bf16``); elsewhere float32, said once on the console.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    _warn_once("amp", f"warning: --amp: this CPU ({cpu_name()}) has no native bf16 (AMX or AVX-512-bf16); "
                      f"running in float32")
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """How a run's network computed: 'fp32', or 'bf16'/'fp16' mixed precision."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A torch.autocast context for ``dtype`` (a no-op context when None)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class PeakMemory:
    """Peak memory while the block runs: on a GPU the most CUDA memory allocated above the level
    at entry; on the CPU the process's peak resident set size (sampled every 5 ms from /proc, so
    it includes the interpreter and loaded data; NaN where /proc is missing). ``mib`` holds the
    result after the block."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError):
            return float("nan")

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self._peak = max(self._peak, self.rss_mib())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._peak = self.rss_mib()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
        else:
            self._done.set()
            self._thread.join()
            self.mib = max(self._peak, self.rss_mib())
        return False


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """Compile ``model``'s forward in place with ``torch.compile`` (fixed shapes) and return it.

    In place (``nn.Module.compile``), so parameter names, checkpoints and attribute access are
    unchanged. The first call for each new input shape compiles; every later call of that shape
    reuses the compiled code. The reference network is what is traced (``models/backend.py``).
    """
    model.compile(dynamic=False)
    return model
