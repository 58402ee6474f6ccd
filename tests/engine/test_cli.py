"""The per-data-set scripts, run as a user runs them, on every layout; and their errors."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.cli import infer_main, train_main
from models.backend import backend_name
from tests.forked_scripts import run_script
from tests.layouts import WRITERS, quick_overrides, write_oasis
from utils.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _sets(dataset):
    return [a for o in quick_overrides(dataset) for a in ("--set", o)]


def _script(name, *args):
    return run_script(name, list(args), cwd=ROOT, timeout=600)


@pytest.mark.parametrize("dataset", sorted(WRITERS))
def test_train_then_infer_scripts(dataset, tmp_path):
    data = WRITERS[dataset](tmp_path / "data")
    ck, out = tmp_path / "ck", tmp_path / "out"
    tr = _script(f"Train_{dataset}.py", "--data-root", str(data), "--epochs", "1", "--max-pairs", "2",
                 "--checkpoint-dir", str(ck), "--device", "cpu", "--no-progress", *_sets(dataset))
    assert tr.returncode == 0, tr.stderr
    assert (ck / "best.pth").is_file() and (ck / "train_log.csv").is_file()
    inf = _script(f"Infer_{dataset}.py", "--data-root", str(data), "--checkpoint", str(ck / "best.pth"),
                  "--output-dir", str(out), "--save-nifti", "--max-pairs", "2", "--no-progress", *_sets(dataset))
    assert inf.returncode == 0, inf.stderr
    assert "Dice (initial)" in inf.stdout and "HD95" in inf.stdout
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for col in ("case", "dice", "dice_initial", "hd95", "pct_nonpos_jac", "sdlogj", "seconds"):
        assert col in rows[0]
    assert any(c.startswith("dice_") and c[5:].isdigit() for c in rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_interpolation"] == "nearest" and summary["summary"]["n_cases"] == 2
    assert "torch" in summary["versions"] and "Infer_" in summary["command"]
    assert "huge_pages" not in summary                   # opt-in (PLCREG_HUGE_PAGES=1), not asked for here
    assert summary["kernels"] == backend_name("cpu")     # which backend ran the network ('cpu-kernels' here)
    assert json.loads((ck / "config.json").read_text())["kernels"] == backend_name("cpu", training=True)
    # NIfTI outputs carry the fixed image's affine (identity for the pickled IXI set)
    fixed_path = rows[0]["fixed"]
    fixed_affine = nib.load(fixed_path).affine if fixed_path.endswith(".nii.gz") else np.eye(4)
    for kind in ("warped", "warped_label", "displacement"):
        img = nib.load(str(out / "nifti" / f"{rows[0]['case']}_{kind}.nii.gz"))
        assert np.allclose(img.affine, fixed_affine)


@pytest.fixture
def oasis(tmp_path):
    return write_oasis(tmp_path / "OASIS")


def _train_args(root, tmp_path):
    return ["--data-root", str(root), "--epochs", "1", "--max-pairs", "1", "--checkpoint-dir", str(tmp_path / "ck"),
            "--no-progress", *_sets("OASIS")]


@pytest.mark.parametrize("breakage,message", [
    (lambda r: (r / "Train").rename(r / "Train_moved"), "Train folder not found"),
    (lambda r: (r / "label" / "OASIS_0001_0000.nii.gz").unlink(), "label of"),
    (lambda r: (r / "Train" / "OASIS_0001_0000.nii.gz").write_bytes(b"corrupt"), "cannot read NIfTI"),
    (lambda r: nib.save(nib.Nifti1Image(np.zeros((32, 40, 36), np.int16), np.eye(4)),
                        str(r / "label" / "OASIS_0001_0000.nii.gz")), "label map is empty"),
    (lambda r: nib.save(nib.Nifti1Image(np.ones((32, 40, 35), np.int16), np.eye(4)),
                        str(r / "label" / "OASIS_0001_0000.nii.gz")), "shape mismatch"),
    (lambda r: nib.save(nib.Nifti1Image(np.full((32, 40, 36), np.nan, np.float32), np.eye(4)),
                        str(r / "Train" / "OASIS_0001_0000.nii.gz")), "NaN/Inf"),
    (lambda r: nib.save(nib.Nifti1Image(np.ones((32, 40), np.float32), np.eye(4)),
                        str(r / "Train" / "OASIS_0001_0000.nii.gz")), "expected a 3D image"),
])
def test_bad_training_input_gives_message_not_traceback(oasis, tmp_path, capsys, breakage, message):
    breakage(oasis)
    args = _train_args(oasis, tmp_path)
    args[args.index("--max-pairs") + 1] = "0"      # visit every subject
    assert train_main("OASIS", args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_checkpoint_of_other_architecture_refused(oasis, tmp_path, capsys, monkeypatch):
    assert train_main("OASIS", _train_args(oasis, tmp_path)) == 0
    args = ["--data-root", str(oasis), "--checkpoint", str(tmp_path / "ck" / "last.pth"), "--output-dir",
            str(tmp_path / "out"), "--no-progress"]
    # inference rebuilds the network from the checkpoint itself: fine (and draws its figures)
    assert infer_main("OASIS", args + ["--figures"]) == 0
    for name in ("registration", "deformation_grid", "jacobian", "dice_per_structure", "training_curves"):
        png = tmp_path / "out" / "figures" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 10_000
    # --compile hands the loaded network to engine.runtime.compile_model (compiling itself is
    # tested in tests/models/test_plcreg.py) and is recorded with the results
    compiled = []
    monkeypatch.setattr("engine.infer.compile_model", lambda model: compiled.append(model) or model)
    assert infer_main("OASIS", args[:-2] + [str(tmp_path / "out_c"), "--no-progress", "--compile"]) == 0
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "PLCReg"
    assert json.loads((tmp_path / "out_c" / "summary.json").read_text())["config"]["eval"]["compile"] is True
    # fine-tuning a different architecture from it is refused, naming the field
    wide = _train_args(oasis, tmp_path / "other") + ["--init-from", str(tmp_path / "ck" / "last.pth"),
                                                     "--set", "model.widths=8,16,16,32,64"]
    capsys.readouterr()
    assert train_main("OASIS", wide) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "widths" in err
    (tmp_path / "bad.pth").write_bytes(b"\x00\x01")
    assert infer_main("OASIS", args[:2] + ["--checkpoint", str(tmp_path / "bad.pth")] + args[4:] + ["--overwrite"]) == 2
    assert "bad.pth: cannot read checkpoint" in capsys.readouterr().err


def test_bad_override_and_real_exit_code(oasis, tmp_path):
    r = _script("Train_OASIS.py", "--data-root", str(oasis), "--set", "train.lr=fast")
    assert r.returncode == 2 and "cannot read a float" in r.stderr and "Traceback" not in r.stderr
    r = _script("Infer_OASIS.py", "--data-root", str(tmp_path / "missing"), "--checkpoint", str(tmp_path / "x.pth"))
    assert r.returncode == 2 and "x.pth: checkpoint file not found" in r.stderr


def test_sigterm_writes_a_checkpoint_that_resume_continues(oasis, tmp_path):
    ck = tmp_path / "ck"
    args = ["--data-root", str(oasis), "--epochs", "200", "--checkpoint-dir", str(ck), "--device", "cpu",
            "--no-progress", *_sets("OASIS")]
    proc = subprocess.Popen([sys.executable, str(ROOT / "Train_OASIS.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (ck / "train_log.csv").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)                       # wait until at least one epoch has been trained
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    saved = read_checkpoint(ck / "last.pth")
    done = saved["epoch"]
    assert 1 <= done < 200
    args[args.index("--epochs") + 1] = str(done + 1)
    r = _script("Train_OASIS.py", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(ck / "last.pth")["epoch"] == done + 1
    with open(ck / "train_log.csv") as fh:
        assert [int(row["epoch"]) for row in csv.DictReader(fh)] == list(range(1, done + 2))


def test_train_voxelmorph_baseline_with_the_same_engine(oasis, tmp_path):
    pytest.importorskip("voxelmorph")
    ck = tmp_path / "vxm"
    args = _train_args(oasis, tmp_path)
    args[args.index("--checkpoint-dir") + 1] = str(ck)
    assert train_main("OASIS", args + ["--model", "voxelmorph"]) == 0
    saved = read_checkpoint(ck / "last.pth")
    assert saved["model_config"]["arch"] == "voxelmorph"
    assert infer_main("OASIS", ["--data-root", str(oasis), "--checkpoint", str(ck / "last.pth"), "--output-dir",
                                str(tmp_path / "out"), "--no-progress", *_sets("OASIS")]) == 0


def test_inference_takes_its_default_checkpoint_from_the_checkpoint_folder(oasis, tmp_path):
    """Without --checkpoint, inference uses <checkpoint folder>/best.pth, whether the folder is
    given as --checkpoint-dir or as --set checkpoint_dir=..."""
    from models import build_model, save_model
    from utils.config import RunConfig, apply_override
    cfg = RunConfig()
    for o in quick_overrides("OASIS"):
        apply_override(cfg, o)
    for i, how in enumerate((["--checkpoint-dir"], ["--set"])):
        folder = tmp_path / f"ck{i}"
        save_model(folder / "best.pth", build_model(cfg.model), run_config=cfg.to_dict())
        given = how + ([str(folder)] if how[0] == "--checkpoint-dir" else [f"checkpoint_dir={folder}"])
        out = tmp_path / f"out{i}"
        assert infer_main("OASIS", ["--data-root", str(oasis), "--output-dir", str(out), "--max-pairs", "1",
                                    "--no-progress", *_sets("OASIS"), *given]) == 0
        assert json.loads((out / "summary.json").read_text())["checkpoint"] == str(folder / "best.pth")
    # --l2r-out: one Learn2Reg field per pair, (D, H, W, 3) on the fixed (atlas) grid
    assert infer_main("OASIS", ["--data-root", str(oasis), "--output-dir", str(tmp_path / "out_l2r"), "--max-pairs",
                                "1", "--no-progress", *_sets("OASIS"), "--checkpoint", str(tmp_path / "ck0" / "best.pth"),
                                "--l2r-out", str(tmp_path / "l2r")]) == 0
    written = list((tmp_path / "l2r").glob("disp_*.nii.gz"))
    atlas = nib.load(str(oasis / "fixed.nii.gz"))
    assert len(written) == 1 and nib.load(str(written[0])).shape == (*atlas.shape, 3)
    # named as the challenge's evaluation looks it up: the atlas's id from its label file's name
    moving_id = next(p for p in sorted((oasis / "Test").iterdir())).name[6:15]
    assert written[0].name == f"disp_0395_0000_{moving_id}.nii.gz"
    assert infer_main("OASIS", ["--data-root", str(oasis), "--output-dir", str(tmp_path / "out_l2r2"), "--max-pairs",
                                "1", "--no-progress", *_sets("OASIS"), "--checkpoint", str(tmp_path / "ck0" / "best.pth"),
                                "--l2r-out", str(tmp_path / "l2r2"), "--l2r-fixed-id", "0400"]) == 0
    assert [p.name for p in (tmp_path / "l2r2").glob("disp_*")] == [f"disp_0400_0000_{moving_id}.nii.gz"]
    assert infer_main("OASIS", ["--data-root", str(oasis), "--output-dir", str(tmp_path / "out_l2r3"), "--max-pairs",
                                "1", "--no-progress", *_sets("OASIS"), "--checkpoint", str(tmp_path / "ck0" / "best.pth"),
                                "--l2r-out", str(tmp_path / "l2r3"), "--l2r-fixed-id", "95"]) == 2
    assert not list((tmp_path / "l2r3").glob("disp_*")) and not (tmp_path / "out_l2r3" / "per_case.csv").exists()
    assert infer_main("OASIS", ["--data-root", str(oasis), "--output-dir", str(tmp_path / "out9"), *_sets("OASIS"),
                                "--checkpoint-dir", str(tmp_path / "empty")]) == 2
