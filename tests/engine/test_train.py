"""Training engine: exact resume, crash-safe checkpoints, best/top-k files, fine-tuning."""
import csv
import signal

import pytest
import torch

import utils.checkpoint as ckpt_mod
from engine import process
from engine.train import Trainer, TrainingDiverged, TrainingInterrupted
from tests.layouts import quick_overrides, write_oasis
from utils.checkpoint import CheckpointError, read_checkpoint
from utils.config import apply_override, preset
from utils.outputs import MANIFEST


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
    # other settings or other data would make the resumed run another experiment: refused, named
    with pytest.raises(CheckpointError, match=r"differs from this one in train.lr \(0.0004 -> 0.001\)"):
        Trainer(_run(oasis_root, tmp_path / "split", 2, **{"train.lr": 1e-3}), resume=True, progress=False)
    other = write_oasis(tmp_path / "OASIS_other", n_train=5, n_test=1)
    with pytest.raises(CheckpointError, match="differs from this one in data list;"):
        Trainer(_run(other, tmp_path / "split", 2), resume=True, progress=False)
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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_entry_point_keeps_the_heap_unless_checkpointing_and_the_trainer_leaves_it(
        oasis_root, tmp_path, monkeypatch, checkpointing):
    calls = []
    monkeypatch.setattr("engine.process.reuse_heap_memory", lambda: calls.append(True))
    Trainer(_run(oasis_root, tmp_path, 1, **{"model.grad_checkpointing": checkpointing}), progress=False)
    assert calls == []                      # a library call changes no process-wide setting
    process.for_training(torch.device("cpu"), checkpointing)
    assert calls == ([] if checkpointing else [True])


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
    assert [n for n in names if n.startswith(".")] == [MANIFEST]       # no temporary files left, no lock


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


def test_non_finite_losses_skip_steps_then_stop_keeping_the_last_good_checkpoint(oasis_root, tmp_path):
    trainer = Trainer(_run(oasis_root, tmp_path, 3, **{"train.max_bad_steps": 3}), progress=False)
    trainer.run_epoch()
    good = read_checkpoint(tmp_path / "last.pth")
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = trainer.objective
    calls = []

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 2 else loss), terms
    trainer.objective = poisoned
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        trainer.run_epoch()
    assert len(calls) == 4                      # one good step, then three skipped
    # skipped steps changed nothing beyond the one good step, and last.pth is the good one
    changed = [k for k in weights if not torch.equal(weights[k], trainer.model.state_dict()[k])]
    assert changed and all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    after = read_checkpoint(tmp_path / "last.pth")
    assert after["epoch"] == good["epoch"] == 1
    assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])


def test_a_single_non_finite_loss_is_skipped_and_logged(oasis_root, tmp_path, capsys):
    trainer = Trainer(_run(oasis_root, tmp_path, 1), progress=False)
    real, calls = trainer.objective, []

    def once(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("inf") if len(calls) == 2 else loss), terms
    trainer.objective = once
    row = trainer.run_epoch()
    assert row["skipped"] == 1 and row["steps"] == len(calls) - 1
    assert "non-finite loss" in capsys.readouterr().err


def test_signal_mid_epoch_writes_a_checkpoint_that_resumes_exactly(oasis_root, tmp_path):
    full = Trainer(_run(oasis_root, tmp_path / "full", 2), progress=False)
    full.fit()
    first = Trainer(_run(oasis_root, tmp_path / "split", 2), progress=False)
    real_step = first.train_step

    def step_then_signal(pairs):
        terms = real_step(pairs)
        if first.step == 5:       # the second epoch's first item (2 items x 2 directions per epoch)
            first._signal = signal.SIGTERM
        return terms
    first.train_step = step_then_signal
    with pytest.raises(TrainingInterrupted) as info:
        first.fit()
    assert info.value.signum == signal.SIGTERM
    saved = read_checkpoint(tmp_path / "split" / "last.pth")
    assert saved["epoch"] == 1 and saved["position"] == 1 and saved["step"] == 6
    resumed = Trainer(_run(oasis_root, tmp_path / "split", 2), resume=True, progress=False)
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.log[-1]["loss"] == pytest.approx(full.log[-1]["loss"], rel=1e-6)
    assert resumed.log[-1]["steps"] == full.log[-1]["steps"]



def test_half_resolution_batch_matches_block_means_in_numpy():
    import numpy as np
    from engine.train import half_resolution_batch
    rng = np.random.default_rng(0)
    img = rng.random((5, 6, 7))
    lab = rng.integers(0, 4, (5, 6, 7))
    t = {"moving": torch.from_numpy(img)[None, None].float(), "fixed_label": torch.from_numpy(lab)[None, None]}
    out = half_resolution_batch(t)
    ref = np.zeros((3, 3, 4))
    for i, j, k in np.ndindex(ref.shape):              # odd sizes: the last block holds what is left
        ref[i, j, k] = img[2 * i:2 * i + 2, 2 * j:2 * j + 2, 2 * k:2 * k + 2].mean()
    assert set(out) == {"moving", "fixed_label"}
    assert np.allclose(out["moving"][0, 0].numpy(), ref, atol=1e-6)
    assert np.array_equal(out["fixed_label"][0, 0].numpy(), lab[::2, ::2, ::2])


def test_half_resolution_phase_trains_on_half_size_and_is_logged(oasis_root, tmp_path, monkeypatch):
    seen = []
    original = Trainer.loss_of

    def recording(self, t):
        seen.append((self.epoch, tuple(t["moving"].shape[2:])))
        return original(self, t)

    monkeypatch.setattr(Trainer, "loss_of", recording)
    trainer = Trainer(_run(oasis_root, tmp_path / "epochs", 2, **{"train.half_res_fraction": 0.5}), progress=False)
    trainer.fit()
    full = tuple(trainer.cache.pair_tensors(trainer.items[0][0], "cpu")["moving"].shape[2:])
    half = tuple(-(-n // 2) for n in full)
    assert {s for e, s in seen if e == 0} == {half} and {s for e, s in seen if e == 1} == {full}
    assert [r["resolution"] for r in trainer.log] == ["half", "full"]
    # a time budget can end the phase inside an epoch: that epoch is logged as both
    calls = iter(range(100))
    monkeypatch.setattr(Trainer, "half_resolution", lambda self: next(calls) < 1)
    mixed = Trainer(_run(oasis_root, tmp_path / "mixed", 1), progress=False)
    mixed.fit()
    assert mixed.log[0]["resolution"] == "half+full"


def test_fine_tuning_from_a_released_checkpoint_as_the_released_code_does(oasis_root, tmp_path):
    from tests.released_format import released_state
    state = released_state(seed=2, window=(2, 2, 2))
    torch.save({"state_dict": state, "epoch": 50}, tmp_path / "final.pth.tar")
    run = _run(oasis_root, tmp_path / "ft", 1, **{"model.widths": "16,32,64,128,256", "model.num_heads": 8,
                                                 "model.window_size": "2,2,2", "model.released_compat": "true",
                                                 "model.freeze_encoder": "true", "model.freeze_upsampling": "true",
                                                 "train.max_pairs": 1})
    ft = Trainer(run, init_from=tmp_path / "final.pth.tar", progress=False)
    assert torch.equal(ft.model.encoder.levels[2][0][0].weight, state["encoder.conv_3.conv1.weight"])
    frozen = {k: v.clone() for k, v in ft.model.state_dict().items() if k.startswith("encoder.") or ".up_context." in k}
    others = {k: v.clone() for k, v in ft.model.state_dict().items() if k not in frozen}
    ft.fit()
    after = ft.model.state_dict()
    assert frozen and all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, after[k]) for k, v in others.items())
    # without the released-compatible mode the released weights are refused, saying how
    wrong = _run(oasis_root, tmp_path / "ft2", 1, **{"model.widths": "16,32,64,128,256", "model.num_heads": 8,
                                                    "model.window_size": "2,2,2"})
    with pytest.raises(ckpt_mod.CheckpointError, match="released_compat=true"):
        Trainer(wrong, init_from=tmp_path / "final.pth.tar", progress=False)
