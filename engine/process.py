"""Process-wide memory settings, made by the scripts' entry points (``engine/cli.py``,
``register.py``, ``demo.py``), never by library calls: they change glibc's allocator and
PyTorch's page use for the whole process, which a caller embedding ``infer()`` or ``Trainer``
in a program of its own should choose.

==============================  =====================================================
:func:`for_inference`           freed blocks returned at once (a lower peak)
:func:`for_training`            freed blocks kept in the heap for the next step (CPU)
``PLCREG_HUGE_PAGES=1``         also back large tensors with transparent huge pages
                                (inference; opt-in: no gain measured in float32)
==============================  =====================================================

Figures: ``benchmarks/RESULTS.md`` (the heap and huge-page sections).
"""
from __future__ import annotations

import os

import torch

HUGE_PAGES_ENV = "PLCREG_HUGE_PAGES"


def for_inference() -> None:
    """An inference process: :func:`limit_heap_retention`, and huge pages where asked for
    (``PLCREG_HUGE_PAGES=1``; call before the first tensor is made)."""
    if os.environ.get(HUGE_PAGES_ENV, "").strip() == "1":
        prefer_huge_pages()
    limit_heap_retention()


def for_training(device: torch.device, grad_checkpointing: bool) -> None:
    """A training process: :func:`reuse_heap_memory` where :func:`keeps_training_heap` says so."""
    if keeps_training_heap(device, grad_checkpointing):
        reuse_heap_memory()


def huge_pages_state() -> bool | None:
    """Whether this process asked for huge pages and got them (None: never asked)."""
    return _huge_pages


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
    """Serve every allocation above ``threshold_bytes`` from its own mapping (glibc ``mallopt``), so
    freed feature maps go back to the system at once instead of staying resident (glibc's
    automatic threshold grows to 32 MB); also after :func:`reuse_heap_memory`. A no-op (False)
    where glibc is not the C library."""
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
    """Back large CPU tensors with transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``): fewer
    page faults for the fresh full-size maps of inference. PyTorch reads the setting once, at the
    first CPU allocation, so call this before any tensor is made; an explicit
    ``THP_MEM_ALLOC_ENABLE`` in the environment is left as set. Returns whether a probe tensor
    allocated afterwards lies in huge pages (False where the kernel's mode is 'never', without
    /proc, or when it came too late)."""
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
    """Serve allocations up to ``limit_bytes`` from glibc's heap and keep freed memory there: a
    training step makes and frees the same large tensors every step, which are then reused
    rather than faulted in afresh (faster steps for a higher peak). The opposite trade to
    :func:`limit_heap_retention`. A no-op (False) where glibc is not the C library."""
    return _mallopt((_M_MMAP_THRESHOLD, limit_bytes), (_M_TRIM_THRESHOLD, limit_bytes))


def keeps_training_heap(device: torch.device, grad_checkpointing: bool) -> bool:
    """Whether a training process keeps freed memory in the heap (:func:`reuse_heap_memory`): on
    the CPU, unless the run trades time for memory with gradient checkpointing (the kept heap
    would take back what checkpointing saves)."""
    return device.type == "cpu" and not grad_checkpointing
