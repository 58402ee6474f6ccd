"""Process-wide memory settings of ``engine.runtime``, each checked in a fresh interpreter (they
change glibc's allocator for the whole process)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A "step" that makes, fills and frees three blocks above glibc's largest automatic mmap
# threshold (32 MB); after three steps, prints the minor page faults of two more.
_SIZES_MB = (36, 48, 40)
_STEPS = """
import resource, sys
import torch
sys.path.insert(0, {root!r})
from engine import runtime
applied = {setup}
def step():
    held = []
    for mb in {sizes!r}:
        block = torch.empty(mb << 20, dtype=torch.uint8)
        block.fill_(1)
        held.append(block)
    held.clear()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
_PAGES = 2 * (sum(_SIZES_MB) << 20) // 4096       # pages the two measured steps touch


def _step_faults(setup: str) -> tuple[bool, int]:
    script = _STEPS.format(root=str(ROOT), setup=setup, sizes=_SIZES_MB)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_reuse_heap_memory_serves_freed_blocks_again_without_faulting_them_in():
    applied, faults = _step_faults("runtime.reuse_heap_memory()")
    if not applied:
        pytest.skip("glibc's mallopt is not available here")
    _, plain_faults = _step_faults("True")
    assert plain_faults > 0.8 * _PAGES        # glibc's default: fresh mappings, every page faults in again
    assert faults < 0.4 * _PAGES              # kept in the heap: mostly reused as they are


@pytest.mark.parametrize("setup", ["runtime.limit_heap_retention()",
                                   "runtime.reuse_heap_memory() and runtime.limit_heap_retention()"])
def test_limit_heap_retention_returns_freed_blocks_at_once(setup):
    # also after reuse_heap_memory: inference after training in one process
    applied, faults = _step_faults(setup)
    if not applied:
        pytest.skip("glibc's mallopt is not available here")
    assert faults > 0.8 * _PAGES              # a mapping of its own each time: the memory went back
