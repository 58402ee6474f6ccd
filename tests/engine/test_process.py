"""Process-wide memory settings of ``engine.process``, each checked in a fresh interpreter (they
change glibc's allocator for the whole process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import process

ROOT = Path(__file__).resolve().parents[2]

# A "step" that makes, fills and frees three blocks above glibc's largest automatic mmap
# threshold (32 MB); after three steps, prints the minor page faults of two more.
_SIZES_MB = (36, 48, 40)
_STEPS = """
import resource, sys
import torch
sys.path.insert(0, {root!r})
from engine import process, runtime
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


def _step_faults(setup: str, huge_pages_from_start: bool = False) -> tuple[bool, int]:
    script = _STEPS.format(root=str(ROOT), setup=setup, sizes=_SIZES_MB)
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if huge_pages_from_start:
        env["THP_MEM_ALLOC_ENABLE"] = "1"          # PyTorch's own switch, set before the interpreter starts
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_reuse_heap_memory_serves_freed_blocks_again_without_faulting_them_in():
    applied, faults = _step_faults("process.reuse_heap_memory()")
    if not applied:
        pytest.skip("glibc's mallopt is not available here")
    _, plain_faults = _step_faults("True")
    assert plain_faults > 0.8 * _PAGES        # glibc's default: fresh mappings, every page faults in again
    assert faults < 0.4 * _PAGES              # kept in the heap: mostly reused as they are


@pytest.mark.parametrize("setup", ["process.limit_heap_retention()",
                                   "process.reuse_heap_memory() and process.limit_heap_retention()"])
def test_limit_heap_retention_returns_freed_blocks_at_once(setup):
    # also after reuse_heap_memory: inference after training in one process
    applied, faults = _step_faults(setup)
    if not applied:
        pytest.skip("glibc's mallopt is not available here")
    assert faults > 0.8 * _PAGES              # a mapping of its own each time: the memory went back


def _huge_page_mode() -> str:
    from engine.process import transparent_huge_page_mode
    if not Path("/proc/self/smaps_rollup").is_file():
        pytest.skip("no /proc/self/smaps_rollup: huge pages are not reported here")
    return transparent_huge_page_mode()


def test_prefer_huge_pages_before_the_first_tensor_cuts_the_page_faults_of_inference_maps():
    mode = _huge_page_mode()
    if mode in ("", "never"):
        pytest.skip(f"the kernel's transparent huge page mode is {mode or 'unknown'!r}")
    _, switched_on_faults = _step_faults("process.limit_heap_retention()", huge_pages_from_start=True)
    if switched_on_faults > 0.25 * _PAGES:
        pytest.skip("the kernel gives no huge pages here even with PyTorch's switch set from the start")
    applied, faults = _step_faults("(process.prefer_huge_pages(), process.limit_heap_retention())[0]")
    # 2 MiB pages fault in 512 times fewer pieces (less the blocks' unaligned ends), 4 KiB pages once each
    assert applied and faults < 0.25 * _PAGES, (applied, faults, _PAGES)
    _, small_page_faults = _step_faults("process.limit_heap_retention()")
    assert small_page_faults > 0.8 * _PAGES


def test_prefer_huge_pages_after_the_first_tensor_reports_it_came_too_late():
    if _huge_page_mode() != "madvise":
        pytest.skip("only where huge pages are given on request (mode 'madvise')")
    applied, faults = _step_faults(
        "torch.ones(1 << 20).sum() and process.prefer_huge_pages() is False "
        "and runtime.provenance()['huge_pages'] is False "
        "and 'THP_MEM_ALLOC_ENABLE' not in __import__('os').environ and process.limit_heap_retention()")
    assert applied      # reported off, in provenance too, and the setting not left for child processes
    assert faults > 0.8 * _PAGES


def test_inference_settings_ask_for_huge_pages_only_when_opted_in():
    """``for_inference`` leaves pages alone unless ``PLCREG_HUGE_PAGES=1`` (no gain measured in
    float32); with it, huge pages are asked for and recorded in the run's provenance."""
    applied, _ = _step_faults("(process.for_inference(), process.huge_pages_state() is None "
                              "and 'THP_MEM_ALLOC_ENABLE' not in __import__('os').environ "
                              "and 'huge_pages' not in runtime.provenance())[1]")
    assert applied
    os.environ[process.HUGE_PAGES_ENV] = "1"
    try:
        applied, _ = _step_faults("(process.for_inference(), process.huge_pages_state() is not None "
                                  "and runtime.provenance()['huge_pages'] == process.huge_pages_state())[1]")
    finally:
        del os.environ[process.HUGE_PAGES_ENV]
    assert applied
