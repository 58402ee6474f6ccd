"""Bad input through the real entry points, each in its own process.

Every case must stop with exit status 2, a message naming the file or setting at fault, no
traceback, and leave the results of a previous run byte-identical. Malicious files (a
checkpoint, an IXI pickle) must neither run their payload nor be accepted.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from models import build_model, save_model
from tests.forked_scripts import run_script
from tests.layouts import AFFINE, quick_overrides, write_ixi, write_oasis
from utils.config import RunConfig, apply_override
from utils.datasets import discover

ROOT = Path(__file__).resolve().parents[1]
QUICK = [a for o in quick_overrides("OASIS") for a in ("--set", o)]


class Payload:
    """Unpickling this object opens (creates) the marker file: code run from a data file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _nii(arr, path: Path, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return str(path)


def _nii_zero_affine(arr, path: Path) -> str:
    """A NIfTI whose sform and voxel sizes are all zeros (no qform): what a broken converter writes."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(arr.dtype)
    hdr["pixdim"][1:4] = 0
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row] = 0
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(arr, None, hdr), str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny OASIS data set, a small checkpoint, own NIfTI files and previous runs' outputs."""
    d = tmp_path_factory.mktemp("bad")
    oasis = write_oasis(d / "OASIS")
    cfg = RunConfig()
    for o in quick_overrides("OASIS"):
        apply_override(cfg, o)
    model = build_model(cfg.model)
    ckpt = save_model(d / "model.pth", model, run_config=cfg.to_dict())
    own = d / "own"
    own.mkdir()
    img = nib.load(str(oasis / "Train" / "OASIS_0001_0000.nii.gz")).get_fdata().astype(np.float32)
    lab = np.asarray(nib.load(str(oasis / "label" / "OASIS_0001_0000.nii.gz")).dataobj).astype(np.int16)
    f = {"fixed": _nii(img, own / "fixed.nii.gz"), "moving": _nii(img[::-1].copy(), own / "moving.nii.gz"),
         "label": _nii(lab, own / "label.nii.gz"),
         "zero_affine": _nii_zero_affine(img, own / "zero_affine.nii.gz"),
         "constant": _nii(np.full(img.shape, 3.0, np.float32), own / "constant.nii.gz"),
         "negative": _nii((lab.astype(np.int32) - 1), own / "negative.nii.gz"),
         "huge": _nii(lab.astype(np.float64) * 3e9, own / "huge.nii.gz"),
         "intensity": _nii(np.arange(img.size, dtype=np.int32).reshape(img.shape) % 5000, own / "intensity.nii.gz"),
         "far": _nii(img, own / "far.nii.gz", AFFINE + np.array([[0, 0, 0, 500.0]] * 3 + [[0, 0, 0, 0]])),
         "shifted_label": _nii(lab, own / "shifted_label.nii.gz", AFFINE + np.array([[0, 0, 0, 4.0]] * 3 + [[0] * 4])),
         "binary_csv": own / "pairs.csv"}
    f["binary_csv"].write_bytes(bytes(range(256)) * 4)
    one = ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
           "Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n")
    (own / "two.txt").write_text(one + one.replace("#Insight Transform File V1.0\n", "").replace("#Transform 0", "#Transform 1"))
    f["bare_field"] = _nii(np.zeros((*img.shape, 3), np.float32), own / "bare_field.nii.gz")
    (own / "dup.csv").write_text(f"moving,fixed\n{f['moving']},{f['fixed']}\n{f['moving']},{f['fixed']}\n")
    (own / "traversal.csv").write_text(f"moving,fixed,name\n{f['moving']},{f['fixed']},../../escaped\n")
    (own / "absolute.csv").write_text(f"moving,fixed,name\n{f['moving']},{f['fixed']},{d}/abs_escaped\n")
    (d / "a_file").write_text("not a folder")
    # a data set whose subjects' label maps lie on another grid than their images
    shifted = write_oasis(d / "OASIS_shifted")
    for p in (shifted / "Test").glob("*.nii.gz"):
        shutil.copy(f["shifted_label"], shifted / "label" / p.name)
    # previous runs whose results must survive every refused run
    prev_infer, prev_register, prev_train = d / "prev_infer", d / "prev_register", d / "prev_train"
    for folder in (prev_infer, prev_register):
        (folder / "nifti").mkdir(parents=True)
        (folder / "per_case.csv").write_text("case,dice\nold,0.5\n")
        (folder / "summary.json").write_text('{"old": true}')
        (folder / "nifti" / "old_warped.nii.gz").write_bytes(b"old")
    locked = d / "locked"          # a run folder held by a live process (this test's own)
    locked.mkdir()
    (locked / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now",
                                              "command": "Train_OASIS.py"}))
    prev_train.mkdir()
    for name in ("last.pth", "best.pth", "train_log.csv", "config.json"):
        shutil.copy(ckpt, prev_train / name) if name.endswith(".pth") else (prev_train / name).write_text("old")
    return {"dir": d, "oasis": oasis, "ckpt": str(ckpt), "prev": [prev_infer, prev_register, prev_train],
            "shifted": shifted, **f}


_FRESH = itertools.count()


def _fresh(w, what):
    """A folder of its own for each run (cases run side by side; a shared folder is refused as busy)."""
    return w["dir"] / f"{what}_{next(_FRESH)}"


def _train(w, *extra, ck=None, root=None):
    return ["Train_OASIS.py", "--data-root", str(root or w["oasis"]), "--epochs", "1", "--no-progress", *QUICK,
            "--checkpoint-dir", str(ck or _fresh(w, "ck_new")), *extra]


def _infer(w, *extra, out=None, root=None, checkpoint=None):
    return ["Infer_OASIS.py", "--data-root", str(root or w["oasis"]), "--checkpoint", str(checkpoint or w["ckpt"]),
            "--no-progress", *QUICK, "--output-dir", str(out or _fresh(w, "infer_new")), *extra]


def _register(w, moving, *extra, out=None, checkpoint=None):
    return ["register.py", "--moving", str(moving), "--fixed", str(w["fixed"]), "--checkpoint",
            str(checkpoint or w["ckpt"]), "--out-dir", str(out or _fresh(w, "reg_new")), "--no-progress", *extra]


def _warp(w, *extra, out=None):
    return ["warp.py", "--input", str(w["moving"]), "--reference", str(w["fixed"]), "--out",
            str(out or w["dir"] / "warp_new.nii.gz"), *extra]


# (case, argv builder, text that must appear in the message)
CASES = [
    ("device bogus", lambda w: _train(w, "--device", "bogus"), "device 'bogus'"),
    ("device bogus (register)", lambda w: _register(w, w["moving"], "--device", "bogus"), "device 'bogus'"),
    ("device bogus (warp)", lambda w: ["warp.py", "--input", str(w["moving"]), "--reference", str(w["fixed"]),
                                       "--out", str(w["dir"] / "warped_bogus.nii.gz"), "--device", "bogus"],
     "device 'bogus'"),
    ("negative lr", lambda w: _train(w, "--lr", "-1"), "lr"),
    ("ncc window 0", lambda w: _train(w, "--set", "train.ncc_window=0"), "ncc_window"),
    ("zero epochs", lambda w: _train(w, "--epochs", "0"), "epochs"),
    ("negative max pairs (train)", lambda w: _train(w, "--max-pairs", "-1"), "max_pairs"),
    ("negative max pairs (infer)", lambda w: _infer(w, "--max-pairs", "-1"), "max_pairs"),
    ("checkpoint dir below a file", lambda w: ["Train_OASIS.py", "--data-root", str(w["oasis"]), *QUICK,
                                                "--checkpoint-dir", str(w["dir"] / "a_file" / "ck")], "a_file is a file"),
    ("output dir below a file", lambda w: _infer(w, out=w["dir"] / "a_file" / "out"), "a_file is a file"),
    ("register out dir below a file", lambda w: _register(w, w["moving"], out=w["dir"] / "a_file" / "o"),
     "a_file is a file"),
    ("fresh training over a previous run", lambda w: _train(w, ck=w["prev"][2]), "--resume"),
    ("folder held by another run", lambda w: _train(w, ck=w["dir"] / "locked"), f"in use by process {os.getpid()}"),
    ("inference over previous results", lambda w: _infer(w, out=w["prev"][0]), "--overwrite"),
    ("register over previous results", lambda w: _register(w, w["moving"], out=w["prev"][1]), "--overwrite"),
    ("all-zero affine", lambda w: _register(w, w["zero_affine"]), "zero_affine.nii.gz: the voxel-to-world affine"),
    ("binary pairs CSV", lambda w: ["register.py", "--pairs", str(w["binary_csv"]), "--checkpoint", w["ckpt"],
                                    "--out-dir", str(w["dir"] / "reg_csv")], "pairs.csv: not a text CSV"),
    ("constant image", lambda w: _register(w, w["constant"]), "constant.nii.gz: image is constant"),
    ("negative labels", lambda w: _register(w, w["moving"], "--moving-label", w["negative"]),
     "negative.nii.gz: label map holds negative"),
    ("labels above int32", lambda w: _register(w, w["moving"], "--moving-label", w["huge"]), "huge.nii.gz"),
    ("intensity image as labels", lambda w: _register(w, w["moving"], "--moving-label", w["intensity"]),
     "intensity.nii.gz: label map has"),
    ("label on another grid (own)", lambda w: _register(w, w["moving"], "--moving-label", w["shifted_label"]),
     "shifted_label.nii.gz: its voxel-to-world affine differs"),
    ("label on another grid (data set)", lambda w: _infer(w, root=w["shifted"]),
     "affine differs"),
    ("labels not in the data set", lambda w: _infer(w, "--set", "data.labels=50,51"), "none of the data set's labels"),
    ("no overlap after resampling", lambda w: _register(w, w["far"], "--affine", "none"),
     "far.nii.gz: does not overlap"),
    ("folder given as the moving image", lambda w: _register(w, w["dir"] / "own"), "own: is a folder without a DICOM series"),
    ("folder given as the checkpoint", lambda w: _infer(w, checkpoint=w["dir"]), "is a folder"),
    ("name escaping the output folder", lambda w: ["register.py", "--pairs", str(w["dir"] / "own" / "traversal.csv"),
                                                   "--checkpoint", w["ckpt"], "--out-dir", str(w["dir"] / "reg_t")],
     "'../../escaped' is not a plain file name"),
    ("reversed CT window", lambda w: _infer(w, "--set", "data.ct_window=800,-500"), "data.ct_window (800.0, -500.0)"),
    ("Learn2Reg id not an id", lambda w: _infer(w, "--l2r-out", str(w["dir"] / "l2r_bad"), "--l2r-fixed-id", "95"),
     "(--l2r-fixed-id) '95'"),
    ("results folder held by another run", lambda w: _infer(w, out=w["dir"] / "locked"),
     f"in use by process {os.getpid()}"),
    ("register folder held by another run", lambda w: _register(w, w["moving"], out=w["dir"] / "locked"),
     f"in use by process {os.getpid()}"),
    ("ITK file of two transforms without a composite", lambda w: _warp(w, "-t", str(w["dir"] / "own" / "two.txt")),
     "two.txt: holds 2 transforms without a CompositeTransform header"),
    ("field that does not say its units", lambda w: _warp(w, "-t", w["bare_field"]),
     "bare_field.nii.gz: a field of shape"),
    ("bogus field units", lambda w: _warp(w, "--field-units", "inches"), "--field-units"),
    ("warp output onto its input", lambda w: _warp(w, "--overwrite", out=w["moving"]), "is the input image"),
    ("two pairs with one output name", lambda w: ["register.py", "--pairs", str(w["dir"] / "own" / "dup.csv"),
                                                  "--checkpoint", w["ckpt"], "--out-dir", str(_fresh(w, "reg_dup"))],
     "lines 2 and 3 would both write 'moving_to_fixed'"),
    ("negative demo budget", lambda w: ["demo.py", "--quick", "--minutes", "-1", "--data-dir", str(_fresh(w, "demo")),
                                        "--out-dir", str(_fresh(w, "demo_out"))], "max_minutes"),
    ("NaN demo budget", lambda w: ["demo.py", "--quick", "--minutes", "nan", "--data-dir", str(_fresh(w, "demo")),
                                   "--out-dir", str(_fresh(w, "demo_out"))], "max_minutes must be a finite number"),
    ("NaN instance-optimisation step", lambda w: _infer(w, "--io-lr", "nan", "--io-steps", "2"), "io_lr"),
    ("infinite smoothness weight", lambda w: _train(w, "--set", "train.reg_weight=inf"), "TrainConfig.reg_weight"),
    ("converter writing over its source", lambda w: ["scripts/convert_released.py", w["ckpt"], w["ckpt"], "--overwrite"],
     "model.pth: is the file being converted"),
    ("NaN cache size", lambda w: _train(w, "--set", "data.cache_mb=nan"), "DataConfig.cache_mb"),
    ("absolute name", lambda w: ["register.py", "--pairs", str(w["dir"] / "own" / "absolute.csv"),
                                 "--checkpoint", w["ckpt"], "--out-dir", str(w["dir"] / "reg_a")],
     "is not a plain file name"),
]


def _run(argv, cwd):
    return run_script(argv[0], argv[1:], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_every_bad_input_stops_cleanly_and_loses_nothing(world, tmp_path):
    before = [_digest(p) for p in world["prev"] + [world["dir"] / "own"]]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: (c, _run(c[1](world), tmp_path)), CASES))
    failures = []
    for (name, _, needle), proc in results:
        problems = [what for what, bad in (("exit status", proc.returncode != 2),
                                           ("traceback", "Traceback" in proc.stderr + proc.stdout),
                                           (f"message lacks {needle!r}", needle not in proc.stderr))
                    if bad]
        if problems:
            failures.append(f"{name}: {', '.join(problems)} (rc {proc.returncode}): {proc.stderr.strip()[-400:]}")
    assert not failures, "\n".join(failures)
    assert [_digest(p) for p in world["prev"] + [world["dir"] / "own"]] == before
    assert not (world["dir"].parent / "escaped").exists() and not (world["dir"] / "abs_escaped").exists()
    assert not list(tmp_path.rglob("*.nii.gz"))           # nothing written where the command ran


def test_malicious_checkpoint_never_runs(world, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"format": "plcreg-checkpoint-v1", "model": {}, "payload": Payload(marker)}, evil)
    runs = [_infer(world, out=tmp_path / "i", checkpoint=evil),
            _register(world, world["moving"], out=tmp_path / "r", checkpoint=evil),
            _train(world, "--init-from", str(evil), ck=tmp_path / "t")]
    for argv in runs:
        proc = _run(argv, tmp_path)
        assert proc.returncode == 2 and "refused" in proc.stderr and "evil.pth" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not marker.exists()
    # --resume from a malicious last.pth
    (tmp_path / "t2").mkdir()
    shutil.copy(evil, tmp_path / "t2" / "last.pth")
    proc = _run(_train(world, "--resume", ck=tmp_path / "t2"), tmp_path)
    assert proc.returncode == 2 and "refused" in proc.stderr and not marker.exists(), proc.stderr


def test_malicious_ixi_pickle_never_runs(tmp_path):
    root = write_ixi(tmp_path / "IXI")
    marker = tmp_path / "marker"
    with open(root / "atlas.pkl", "wb") as fh:
        pickle.dump((Payload(marker), np.zeros((4, 4, 4))), fh)
    quick = [a for o in quick_overrides("IXI") for a in ("--set", o)]
    proc = _run(["Infer_IXI.py", "--data-root", str(root), "--checkpoint", "none", "--io-steps", "1", *quick,
                 "--output-dir", str(tmp_path / "out"), "--no-progress"], tmp_path)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr
    assert "atlas.pkl" in proc.stderr and "refused to load io.open" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_validation_subject_stops_before_the_first_epoch(world, tmp_path):
    root = tmp_path / "OASIS"
    shutil.copytree(world["oasis"], root)
    cfg = RunConfig()
    for o in quick_overrides("OASIS"):
        apply_override(cfg, o)
    val = discover(cfg.data, root, cfg.train.seed).val[0]
    arr = nib.load(val.image).get_fdata().astype(np.float32)
    arr[0, 0, 0] = np.nan
    _nii(arr, Path(val.image))
    proc = _run(_train(world, root=root, ck=tmp_path / "ck"), tmp_path)
    assert proc.returncode == 2 and Path(val.image).name in proc.stderr and "NaN" in proc.stderr, proc.stderr
    assert not (tmp_path / "ck" / "train_log.csv").exists() and not (tmp_path / "ck" / "last.pth").exists()


def _limited(max_bytes):
    """In the child: files may grow to ``max_bytes`` at most (a full disk, for a test), and a
    write beyond it fails with an error instead of killing the process."""
    def limit():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def _run_limited(argv, cwd, max_bytes):
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=_limited(max_bytes), timeout=300)


def test_a_failed_write_is_one_line_naming_the_file_and_what_was_kept(world, tmp_path):
    ck = tmp_path / "ck"
    assert _run(_train(world, ck=ck), tmp_path).returncode == 0
    before = _digest(ck)
    proc = _run_limited(_train(world, "--resume", "--epochs", "2", ck=ck), tmp_path, 4096)
    message = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message.startswith(f"error: {ck}") and "cannot write (File too large)" in message, message
    assert f"the last complete checkpoint {ck / 'last.pth'} is kept" in message
    after = _digest(ck)
    assert after["last.pth"] == before["last.pth"] and after["best.pth"] == before["best.pth"]
    assert not [n for n in after if n.startswith(".plcreg-partial")]

    out = tmp_path / "infer"
    proc = _run_limited(_infer(world, "--save-nifti", out=out), tmp_path, 4096)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {out / 'nifti'}" in proc.stderr and "finished pair(s) are kept in" in proc.stderr

    proc = _run_limited(["warp.py", "--input", str(world["moving"]), "--reference", str(world["fixed"]),
                         "--out", str(tmp_path / "w.nii.gz")], tmp_path, 1024)
    assert proc.returncode == 2 and f"error: {tmp_path / 'w.nii.gz'}: cannot write" in proc.stderr, proc.stderr
    assert not (tmp_path / "w.nii.gz").exists()


def test_overwrite_removes_only_the_previous_run_s_own_files(world, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert _run(_register(world, world["moving"], out=out), tmp_path).returncode == 0
    case = "moving_to_fixed"
    (out / "sub1_affine.txt").write_text("another tool's transform")          # named like a result
    elsewhere.mkdir()
    (elsewhere / "x_warped.nii.gz").write_bytes(b"a file behind a link")
    (out / "linked").symlink_to(elsewhere)
    own_input = out / f"{case}_warped.nii.gz"                                  # a result used as the next input
    before = own_input.read_bytes()
    proc = _run(_register(world, own_input, "--overwrite", out=out), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert own_input.read_bytes() == before                                     # an input is never removed
    assert (out / "sub1_affine.txt").read_text() == "another tool's transform"
    assert (elsewhere / "x_warped.nii.gz").exists()
    assert not (out / f"{case}_displacement.nii.gz").exists()                   # the previous run's own: gone
    assert (out / f"{case}_warped_to_fixed_displacement.nii.gz").exists()


def test_a_fresh_training_run_leaves_the_user_s_hidden_files_alone(world, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / ".notes.20261203.txt").write_text("my notes")
    assert _run(_train(world, ck=ck), tmp_path).returncode == 0
    assert (ck / ".notes.20261203.txt").read_text() == "my notes"


def test_resume_with_other_weights_under_the_same_name_is_refused(world, tmp_path):
    from engine.cli import build_run, infer_parser
    from engine.infer import FinishedPairs
    from engine.resume_key import pair_files, resume_key
    from models import load_model
    out, ckpt = tmp_path / "out", tmp_path / "model.pth"
    shutil.copy(world["ckpt"], ckpt)
    argv = _infer(world, out=out, checkpoint=ckpt)[1:]
    run = build_run("OASIS", infer_parser("OASIS").parse_args(argv), training=False)
    pairs = discover(run.data, None, run.train.seed).test_pairs()
    stopped = FinishedPairs(out / "partial")                # a run stopped after its first pair
    stopped.start(resume_key("inference", run, pair_files(pairs), load_model(ckpt)[0]))
    stopped.add({"case": pairs[0].name, "dice": 0.5})
    rows_before = _digest(out)
    cfg = RunConfig()
    for o in quick_overrides("OASIS"):
        apply_override(cfg, o)
    save_model(ckpt, build_model(cfg.model))               # replaced in place: same path, other weights
    proc = _run(["Infer_OASIS.py", *argv, "--resume"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the stopped run differs from this one in weights;" in proc.stderr
    assert _digest(out) == rows_before
