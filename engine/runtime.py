"""Run-time helpers: device choice, seeding, provenance (command and package versions)."""
from __future__ import annotations

import functools
import os
import platform
import random
import shlex
import sys
import threading
from importlib import metadata

import numpy as np
import torch

from models.backend import cpu_has_native_bf16


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an unavailable CUDA request falls back to CPU with a warning."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"warning: device {name!r} requested but CUDA is not available; using the CPU", file=sys.stderr)
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


@functools.lru_cache(maxsize=None)
def _cpuinfo(key: str) -> str:
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


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_features() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo 'flags'; empty where unknown)."""
    return set(_cpuinfo("flags").split())


def provenance(device=None) -> dict:
    """What every result file records about its run: command, package versions, CPU, device."""
    out = {"command": command_line(), "versions": package_versions(), "cpu": cpu_name()}
    if _huge_pages is not None:
        out["huge_pages"] = _huge_pages
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters
_GLIBC_TRIM_DEFAULT = 128 * 1024


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings; False (nothing changed) where glibc is not the C library."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return all(bool(libc.mallopt(option, int(value))) for option, value in settings)
    except (OSError, AttributeError):
        return False


def limit_heap_retention(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation above ``threshold_bytes`` from its own mapping (glibc ``mallopt``).

    glibc raises its mmap threshold up to 32 MB as large blocks are freed, after which
    feature maps of the coarse levels land in the heap and stay resident after being freed:
    about 0.35 GB of a full-size OASIS pair's peak. A fixed threshold returns them at once.
    Free memory at the top of the heap goes back above glibc's default 128 KiB, also after
    :func:`reuse_heap_memory` (inference after training in one process). A no-op (False) where
    glibc is not the C library.
    """
    return _mallopt((_M_MMAP_THRESHOLD, threshold_bytes), (_M_TRIM_THRESHOLD, _GLIBC_TRIM_DEFAULT))


_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_page_mode() -> str:
    """The kernel's transparent huge page mode ('always', 'madvise' or 'never'); '' where unknown."""
    try:
        with open(_THP_MODE_FILE) as fh:
            text = fh.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def _anon_huge_kib() -> int | None:
    try:
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def prefer_huge_pages() -> bool:
    """Back large CPU tensors with transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``), for inference.

    Inference makes a few dozen fresh full-size maps per pair, and with 4 KiB pages each costs
    one page fault per 4 KiB (about a million per full-size OASIS pair); with 2 MiB pages a bf16
    pair faulted about 8x less and took 0.75-0.98x the time in six of seven side-by-side process
    pairs on two threads (1.21x in one), peak memory unchanged; the kernel still zeroes every fresh
    page (most of the system time left). PyTorch reads the setting once, at the process's
    first CPU allocation, so call this before any tensor is made; an explicit
    ``THP_MEM_ALLOC_ENABLE`` in the environment is left as set. Not for training (its steps
    reuse memory from the heap instead: :func:`reuse_heap_memory`).

    Returns whether a probe tensor allocated afterwards lies in huge pages (False where the
    kernel's mode is 'never', on systems without /proc, or when it came too late).
    """
    global _huge_pages
    ours = "THP_MEM_ALLOC_ENABLE" not in os.environ
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    before = _anon_huge_kib()
    _huge_pages = False
    if before is not None and transparent_huge_page_mode() not in ("", "never"):
        probe = torch.empty(8 << 20, dtype=torch.uint8)         # 8 MiB: at least one whole aligned 2 MiB page
        probe.fill_(1)                                          # touched, so its pages exist
        after = _anon_huge_kib()
        _huge_pages = after is not None and after - before >= 2048
    if ours and not _huge_pages:
        del os.environ["THP_MEM_ALLOC_ENABLE"]      # no effect here: not handed on to child processes either
    return _huge_pages


_huge_pages: bool | None = None


def reuse_heap_memory(limit_bytes: int = 1 << 30) -> bool:
    """Serve allocations up to ``limit_bytes`` from glibc's heap and keep freed memory there, for training.

    A training step makes and frees the same large tensors at every step. Served from their
    own mappings (glibc's choice above 32 MB), each is fresh memory whose pages fault in again,
    every step: at 80x96x80 on two threads that was 1.4 M page faults and about 3 s of system
    time per float32 step. From the heap they are reused: a float32 step took 0.72-0.78x the
    time, for a peak about 15 % higher (blocks kept between steps); bf16 steps of that size,
    whose maps are under 32 MB and so in the heap already, did not change beyond noise. The
    opposite trade to :func:`limit_heap_retention`, which inference takes; the trainer takes it
    when :func:`keeps_training_heap` says so. A no-op (False) where glibc is not the C library.
    """
    return _mallopt((_M_MMAP_THRESHOLD, limit_bytes), (_M_TRIM_THRESHOLD, limit_bytes))


def keeps_training_heap(device: torch.device, grad_checkpointing: bool) -> bool:
    """Whether a training process keeps freed memory in the heap (:func:`reuse_heap_memory`): on
    the CPU, unless the run trades time for memory with gradient checkpointing. At full size
    (160x224x192, bf16, two threads) the kept heap took a step from 51.8 to 35.4 s and its peak
    from 14.5 to 18.7 GB; with checkpointing from 58.9 to 40.9 s but from 10.4 to 18.5 GB, all of
    what checkpointing saves."""
    return device.type == "cpu" and not grad_checkpointing


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """Compile ``model``'s forward in place with ``torch.compile`` (fixed shapes) and return it.

    In place (``nn.Module.compile``), so parameter names, checkpoints and attribute access are
    unchanged. The first call for each new input shape compiles (up to 1.5 minutes on two CPU
    cores at full size); every later call of that shape reuses the compiled code. PLCReg traces as one graph:
    its convolutions stay oneDNN calls (``models.cpu_kernels.onednn_conv3d``) on the CPU.
    """
    model.compile(dynamic=False)
    return model
