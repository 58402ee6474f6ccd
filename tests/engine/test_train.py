"""Training engine: exact resume, crash-safe checkpoints, best/top-k files, fine-tuning."""
import csv

import pytest
import torch

import utils.checkpoint as ckpt_mod
from engine.train import Trainer
from tests.layouts import quick_overrides, write_oasis
from utils.checkpoint import read_checkpoint
from utils.config import apply_override, preset


def _run(root, ckdir, epochs, **extra):
    run = preset("OASIS")
    for o in quick_overrides("OASIS"):
        apply_override(run, o)
    run.data.root, run.checkpoint_dir, run.device = str(root), str(ckdir), "cpu"
    run.train.epochs, run.train.max_pairs = epochs, 2
    for k, v in extra.items():
        apply_override(run, f"{k}={v}")
    return run


@pytest.fixture(scope="module")
def oasis_root(tmp_path_factory):
    return write_oasis(tmp_path_factory.mktemp("data") / "OASIS", n_train=4, n_test=1)


def test_resume_equals_uninterrupted_run(oasis_root, tmp_path):
    full = Trainer(_run(oasis_root, tmp_path / "full", 2), progress=False)
    full.fit()
    first = Trainer(_run(oasis_root, tmp_path / "split", 1), progress=False)
    first.fit()
    resumed = Trainer(_run(oasis_root, tmp_path / "split", 2), resume=True, progress=False)
    assert resumed.epoch == 1
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)
    with open(tmp_path / "split" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["loss"]) == pytest.approx(full.log[1]["loss"], rel=1e-6)


def test_checkpoint_files_and_contents(oasis_root, tmp_path):
    trainer = Trainer(_run(oasis_root, tmp_path, 3, **{"train.keep_top_k": 2}), progress=False)
    trainer.fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    dsc = [n for n in names if n.startswith("dsc")]
    assert {"last.pth", "best.pth", "config.json", "train_log.csv"} <= set(names) and len(dsc) == 2
    last = read_checkpoint(tmp_path / "last.pth")
    assert last["epoch"] == 3 and "optimizer" in last and last["run_config"]["train"]["epochs"] == 3
    best = read_checkpoint(tmp_path / "best.pth")
    assert best["best_val_dice"] == max(r["val_dice"] for r in trainer.log)
    kept = sorted(float(n[3:9]) for n in dsc)
    assert kept == sorted(round(r["val_dice"], 4) for r in trainer.log)[-2:]
    assert not any(n.startswith(".") for n in names)          # no temporary files left


def test_kill_during_checkpoint_write_keeps_last_intact(oasis_root, tmp_path, monkeypatch):
    trainer = Trainer(_run(oasis_root, tmp_path, 2), progress=False)
    trainer.run_epoch()
    before = read_checkpoint(tmp_path / "last.pth")

    def dying_save(obj, fh, *a, **k):
        fh.write(b"partial checkpoint bytes")
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_epoch()
    monkeypatch.undo()
    after = read_checkpoint(tmp_path / "last.pth")
    assert after["epoch"] == before["epoch"] == 1
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_fine_tuning_from_checkpoint_with_frozen_encoder(oasis_root, tmp_path):
    src = Trainer(_run(oasis_root, tmp_path / "src", 1), progress=False)
    src.fit()
    run = _run(oasis_root, tmp_path / "ft", 1, **{"model.freeze_encoder": "true"})
    ft = Trainer(run, init_from=tmp_path / "src" / "last.pth", progress=False)
    enc_before = {k: v.clone() for k, v in ft.model.encoder.state_dict().items()}
    assert all(torch.equal(enc_before[k], src.model.encoder.state_dict()[k]) for k in enc_before)
    ft.fit()
    assert all(torch.equal(enc_before[k], v) for k, v in ft.model.encoder.state_dict().items())
    est_changed = any(not torch.equal(a, b) for a, b in zip(ft.model.levels.parameters(), src.model.levels.parameters()))
    assert est_changed
