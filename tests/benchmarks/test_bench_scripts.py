"""The benchmark scripts run end to end on a tiny volume and print one table row per variant
(their figures are measured by hand, never asserted)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _rows(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    table = out.stdout.strip().split("\n\n")[-1].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in table[2:] if line.startswith("|")]


def test_bench_inference_rows_for_the_kernels_and_the_reference():
    rows = _rows("bench_inference.py", "--sizes", "32x32x32", "--runs", "1", "--warmup", "0",
                 "--widths", "8", "16", "16", "32", "32", "--window", "2", "2", "2", "--reference")
    assert [r[3] for r in rows] == ["fp32", "fp32, reference"]
    for r in rows:
        assert r[0] == "32x32x32" and r[1] == "cpu" and float(r[6]) > 0 and float(r[8]) > 0
        assert float(r[5]) > 0                                  # GMACs from torch's flop counter


def test_bench_train_rows_for_each_variant_and_heap_setting():
    rows = _rows("bench_train.py", "--sizes", "32x32x32", "--networks", "light", "--variants", "fp32", "ckpt",
                 "--runs", "1", "--warmup", "0", "--window", "2", "2", "2", "--heap", "both")
    assert [(r[1], r[2]) for r in rows] == [("light", "fp32"), ("light", "fp32, plain heap"),
                                            ("light", "ckpt"), ("light", "ckpt, plain heap")]
    assert all(float(r[6]) > 0 and float(r[8]) > 0 for r in rows)


def test_bench_train_by_default_sets_the_heap_as_the_trainer_does():
    # kept for plain steps, glibc's default with checkpointing (which is there to save memory)
    rows = _rows("bench_train.py", "--sizes", "32x32x32", "--networks", "light", "--variants", "fp32", "ckpt",
                 "--runs", "1", "--warmup", "0", "--window", "2", "2", "2")
    assert [(r[1], r[2]) for r in rows] == [("light", "fp32"), ("light", "ckpt, plain heap")]


def test_bench_inference_profile_lists_the_heaviest_operators():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--sizes", "32x32x32",
                          "--runs", "1", "--warmup", "0", "--widths", "8", "16", "16", "32", "32", "--window", "2", "2",
                          "2", "--no-flops", "--profile", "4"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    section, by_grid = out.stdout.split("Where the time goes: 32x32x32, fp32")[1].split("By grid")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| operator")]
    assert len(rows) == 4
    # every operator's time counted once, under the grid of its largest volume input
    grids = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in by_grid.splitlines()
                               if line.startswith("| ") and not line.startswith("| grid"))}
    assert set(grids) <= {"full size", "half size", "smaller", "no volume input"} and "full size" in grids
    assert abs(sum(float(r[2].rstrip(" %")) for r in grids.values()) - 100.0) < 0.3
    assert "convolution" in grids["full size"][3]
    seconds = [float(r[3]) for r in rows]
    assert seconds == sorted(seconds, reverse=True)                    # heaviest first
    assert sum(float(r[4].rstrip(" %")) for r in rows) <= 100.0
    assert any("convolution" in r[0] for r in rows)
