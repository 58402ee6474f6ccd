"""Multi-process training with torchrun (gloo on CPU) and the sharding of epochs across ranks."""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.distributed import Context, shard
from tests.layouts import quick_overrides, write_oasis
from utils.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n_items,world", [(8, 2), (9, 2), (7, 3), (2, 4)])
def test_shards_are_disjoint_and_cover_every_item(n_items, world):
    order = list(range(n_items))
    shares = [shard(order, Context(rank, world)) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1                    # same number of steps on every rank
    assert set().union(*map(set, shares)) == set(order)          # together all of them
    if n_items % world == 0:
        flat = [i for s in shares for i in s]
        assert len(flat) == len(set(flat)) == n_items            # disjoint
    assert shard(order, Context()) == order


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_train_in_sync(tmp_path):
    data = write_oasis(tmp_path / "OASIS", n_train=6, n_test=1)
    ck = tmp_path / "ck"
    sets = [a for o in quick_overrides("OASIS") for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         str(ROOT / "Train_OASIS.py"), "--data-root", str(data), "--epochs", "1", "--checkpoint-dir", str(ck),
         "--device", "cpu", "--no-progress", *sets, "--set", "data.val_subjects=2",
         # a wall-time half-resolution phase: every rank follows rank 0's clock
         "--set", "train.max_minutes=30", "--set", "train.half_res_fraction=0.5"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "weights identical on 2 ranks" in res.stdout
    assert res.stdout.count("epoch 1/1") == 1                    # only rank 0 reports
    files = sorted(p.name for p in ck.iterdir())
    assert files.count("last.pth") == 1 and files.count("train_log.csv") == 1
    with open(ck / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    # 4 training subjects, 2 directions each = 8 steps, split over 2 ranks
    assert len(rows) == 1 and int(rows[0]["steps"]) == 4 and rows[0]["resolution"] == "half"
    assert read_checkpoint(ck / "last.pth")["world_size"] == 2
    out = tmp_path / "out"
    inf = subprocess.run([sys.executable, str(ROOT / "Infer_OASIS.py"), "--data-root", str(data), "--checkpoint",
                          str(ck / "last.pth"), "--output-dir", str(out), "--no-progress", *sets],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert inf.returncode == 0, inf.stderr
    assert (out / "summary.json").is_file()


def test_torchrun_shards_inference_and_merges_the_same_rows(tmp_path):
    from models import build_model, save_model
    from utils.config import ModelConfig
    data = write_oasis(tmp_path / "OASIS", n_train=1, n_test=3)          # 3 pairs: uneven over 2 ranks
    ckpt = save_model(tmp_path / "tiny.pth", build_model(ModelConfig(widths=(4, 8, 16, 16, 16), num_heads=2,
                                                                     window_size=(2, 2, 2))))
    sets = [a for o in quick_overrides("OASIS") for a in ("--set", o)]
    common = [str(ROOT / "Infer_OASIS.py"), "--data-root", str(data), "--checkpoint", str(ckpt), "--device", "cpu",
              "--no-progress", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", *common, "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("3 test pairs") == 1 and "2 ranks" in two.stdout        # rank 0 reports, once
    one = subprocess.run([sys.executable, *common, "--output-dir", str(tmp_path / "one")], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    def rows(folder):
        with open(folder / "per_case.csv") as fh:
            return sorted(({k: v for k, v in r.items() if k not in ("seconds", "end_to_end_seconds")}
                           for r in csv.DictReader(fh)), key=lambda r: r["case"])
    assert rows(tmp_path / "two") == rows(tmp_path / "one") and len(rows(tmp_path / "one")) == 3
    assert not (tmp_path / "two" / "partial").exists()
