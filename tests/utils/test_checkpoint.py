"""Checkpoint files: weights-only reading, the keeper's last/best/top-k, and killed writes."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.checkpoint import CheckpointError, CheckpointKeeper, load_weights_only, read_checkpoint, save_checkpoint
from utils.outputs import MANIFEST
from utils.io import DataError

ROOT = Path(__file__).resolve().parents[2]


class Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_plain_checkpoint_loads_and_code_in_a_file_is_refused(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    path = save_checkpoint(tmp_path / "ok.pth", {"arch": "plcreg", "widths": [8, 16]}, state,
                           top=[(0.5, "dsc0.5000_ep0001.pth")], torch_rng=torch.get_rng_state(), epoch=3)
    ckpt = read_checkpoint(path)
    assert torch.equal(ckpt["model"]["w"], state["w"]) and ckpt["epoch"] == 3 and ckpt["top"] == [(0.5, "dsc0.5000_ep0001.pth")]
    marker = tmp_path / "marker"
    torch.save({"format": "plcreg-checkpoint-v1", "model": {}, "x": Marker(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: refused"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    # numpy objects are not plain values either: refused, not loaded
    torch.save({"format": "plcreg-checkpoint-v1", "a": np.zeros(3)}, tmp_path / "numpy.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_weights_only(tmp_path / "numpy.pth")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)


def _keeper(folder, **kw):
    return CheckpointKeeper(folder, keep_top_k=2).open(log=lambda m: None, **kw)


def test_keeper_keeps_last_best_and_top_k(tmp_path):
    keeper = _keeper(tmp_path)
    scores = [0.5, 0.7, 0.6, 0.4]
    for epoch, score in enumerate(scores, start=1):
        keeper.save(lambda e=epoch: {"epoch": e}, score, epoch)
    assert read_epoch(tmp_path / "last.pth") == 4 and read_epoch(tmp_path / "best.pth") == 2
    assert sorted(p.name for p in tmp_path.glob("dsc*.pth")) == ["dsc0.6000_ep0003.pth", "dsc0.7000_ep0002.pth"]
    assert keeper.best == 0.7 and keeper.top == [(0.7, "dsc0.7000_ep0002.pth"), (0.6, "dsc0.6000_ep0003.pth")]
    keeper.close()
    # a NaN score (nothing validated this epoch) never becomes best
    k2 = _keeper(tmp_path, resume=True)
    k2.restore({"best_val_dice": 0.7, "top": keeper.top})
    k2.save(lambda: {"epoch": 5}, math.nan, 5)
    assert read_epoch(tmp_path / "best.pth") == 2 and read_epoch(tmp_path / "last.pth") == 5
    k2.close()


def read_epoch(path):
    return torch.load(path, weights_only=True)["epoch"]


def test_previous_run_is_refused_unless_resume_or_overwrite(tmp_path):
    keeper = _keeper(tmp_path)
    keeper.save(lambda: {"epoch": 1}, 0.9, 1)
    keeper.close()
    before = (tmp_path / "best.pth").read_bytes()
    with pytest.raises(DataError, match="--resume.*--overwrite"):
        _keeper(tmp_path)
    assert (tmp_path / "best.pth").read_bytes() == before and not (tmp_path / ".lock").exists()
    _keeper(tmp_path, resume=True).close()
    _keeper(tmp_path, overwrite=True).close()
    assert not list(tmp_path.glob("*.pth"))


WRITER = """
import sys, torch
from utils.checkpoint import CheckpointKeeper
keeper = CheckpointKeeper(sys.argv[1], keep_top_k=2).open(resume=True, log=print)
state = {"w": torch.randn(1_500_000)}
print("ready", flush=True)
epoch = 0
while True:
    epoch += 1
    keeper.save(lambda: {**state, "epoch": epoch}, (epoch % 7) / 10, epoch)
"""


def test_kill_during_writes_leaves_a_loadable_last_and_no_temporaries(tmp_path):
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT)
        assert proc.stdout.readline().strip().startswith(("ready", "note"))
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 6
    keeper = CheckpointKeeper(tmp_path, keep_top_k=2).open(resume=True, log=lambda m: None)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name not in (".lock", MANIFEST)]
    assert leftovers == []
    assert read_checkpoint_state(tmp_path / "last.pth")["w"].numel() == 1_500_000
    keeper.close()
    assert not (tmp_path / ".lock").exists()


def read_checkpoint_state(path):
    return load_weights_only(path)


class Killed(BaseException):
    """Stands for SIGKILL between two file operations of a save."""


SCORES = [0.5, 0.7, 0.6, 0.8, 0.4, 0.75]


def _train_like(keeper, epochs):
    for epoch in epochs:
        keeper.save(lambda e=epoch: {"epoch": e, "best_val_dice": keeper.best, "top": list(keeper.top)},
                    SCORES[epoch - 1], epoch)


def _consistent(folder):
    """The invariants a resumed run relies on, read from the files alone."""
    last = load_weights_only(folder / "last.pth")
    listed = [name for _, name in last["top"]]
    assert all((folder / n).is_file() for n in listed), (listed, sorted(p.name for p in folder.iterdir()))
    assert load_weights_only(folder / "best.pth")["best_val_dice"] >= last["best_val_dice"]
    return last


@pytest.mark.parametrize("kill_at", range(5))
def test_a_kill_at_any_file_operation_of_a_save_leaves_last_best_and_top_k_consistent(tmp_path, monkeypatch,
                                                                                   kill_at):
    import utils.checkpoint as ck
    reference = tmp_path / "reference"
    _train_like(CheckpointKeeper(reference, keep_top_k=2).open(log=lambda m: None), range(1, 7))
    folder = tmp_path / "killed"
    keeper = CheckpointKeeper(folder, keep_top_k=2).open(log=lambda m: None)
    _train_like(keeper, range(1, 4))
    # epoch 4 improves the best and drops epoch 3's file: dsc write, best, last, removal
    operations = {"n": 0}

    def counted(real):
        def op(*args, **kw):
            if operations["n"] == kill_at:
                raise Killed
            operations["n"] += 1
            return real(*args, **kw)
        return op
    monkeypatch.setattr(ck, "atomic_save", counted(ck.atomic_save))
    monkeypatch.setattr(ck, "_link_over", counted(ck._link_over))
    monkeypatch.setattr(Path, "unlink", counted(Path.unlink))
    try:
        _train_like(keeper, [4])
    except Killed:
        pass
    monkeypatch.undo()
    keeper.lock.release()
    last = _consistent(folder)
    resumed = CheckpointKeeper(folder, keep_top_k=2).open(resume=True, log=lambda m: None)
    resumed.restore(last, log=lambda m: None)
    assert sorted(p.name for p in folder.glob("dsc*.pth")) == sorted(n for _, n in resumed.top)
    _train_like(resumed, range(last["epoch"] + 1, 7))
    resumed.close()
    _consistent(folder)
    names = lambda f: sorted(p.name for p in f.iterdir() if p.name != ".lock")   # noqa: E731
    assert names(folder) == names(reference)
    for name in ("best.pth", "last.pth"):
        assert load_weights_only(folder / name)["epoch"] == load_weights_only(reference / name)["epoch"]


def test_user_files_that_look_temporary_are_left_alone(tmp_path):
    (tmp_path / ".notes.20261203.txt").write_text("mine")
    (tmp_path / ".tmp.plan.abcdefgh.txt").write_text("mine too")
    (tmp_path / ".plcreg-partial.last.k3j9x0_q.pth").write_bytes(b"left by a killed write")
    keeper = CheckpointKeeper(tmp_path).open(log=lambda m: None)
    keeper.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != MANIFEST) == [".notes.20261203.txt",
                                                                               ".tmp.plan.abcdefgh.txt"]


def test_overwrite_removes_the_previous_run_s_own_files_only(tmp_path):
    keeper = _keeper(tmp_path)
    keeper.save(lambda: {"epoch": 1}, 0.5, 1)
    keeper.close()
    (tmp_path / "best.pth").unlink()
    torch.save({"mine": torch.zeros(2)}, tmp_path / "best.pth")         # the user's file under a run name
    (tmp_path / "notes.txt").write_text("mine")
    notes = []
    CheckpointKeeper(tmp_path, keep_top_k=2).open(overwrite=True, log=notes.append).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".plcreg-manifest.jsonl", "best.pth", "notes.txt"]
    assert "mine" in torch.load(tmp_path / "best.pth", weights_only=True)
    assert any("kept best.pth" in n for n in notes)
    # a folder of a version without a manifest: the run's files by their names
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("last.pth", "best.pth", "dsc0.5000_ep0001.pth", "notes.txt"):
        (legacy / name).write_bytes(b"x")
    CheckpointKeeper(legacy).open(overwrite=True, log=lambda m: None).close()
    assert sorted(p.name for p in legacy.iterdir() if not p.name.startswith(".")) == ["notes.txt"]
