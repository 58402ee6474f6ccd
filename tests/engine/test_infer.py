"""Cohort inference: a stopped run resumes without redoing finished pairs, and the background
pipeline changes nothing in the results."""
import csv

import nibabel as nib
import numpy as np
import pytest
import torch

import engine.infer as infer_module
from engine.assembly import assemble_run
from engine.infer import infer, save_pair_outputs
from models import build_model, save_model
from tests.layouts import AFFINE, quick_overrides, write_oasis
from utils.config import ModelConfig
from utils.io import DataError, Volume

TIMING = ("seconds", "end_to_end_seconds", "io_seconds")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    data = write_oasis(d / "OASIS", n_train=1, n_test=4)
    model = build_model(ModelConfig(widths=(4, 8, 16, 16, 16), num_heads=2, window_size=(2, 2, 2)))
    return {"data": data, "ckpt": save_model(d / "tiny.pth", model), "dir": d}


def _run(setting, out, **settings):
    return assemble_run("OASIS", overrides=quick_overrides("OASIS"),
                        settings={"data.root": str(setting["data"]), "output_dir": str(out), "device": "cpu", **settings})


def _rows(out):
    with open(out / "per_case.csv") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def test_background_pipeline_gives_the_plain_loop_s_results(setting, tmp_path):
    plain = infer(_run(setting, tmp_path / "plain", **{"eval.background": False}), setting["ckpt"], progress=False)
    background = infer(_run(setting, tmp_path / "bg"), setting["ckpt"], progress=False, save_nifti=True)
    assert len(plain["rows"]) == 4
    assert _rows(tmp_path / "plain") == _rows(tmp_path / "bg")
    assert len(list((tmp_path / "bg" / "nifti").glob("*_displacement.nii.gz"))) == 4
    assert all(r["end_to_end_seconds"] >= r["seconds"] * 0.5 for r in background["rows"])


def test_a_stopped_run_resumes_without_redoing_finished_pairs(setting, tmp_path, monkeypatch):
    full = tmp_path / "full"
    infer(_run(setting, full), setting["ckpt"], progress=False)
    calls = []
    real = infer_module.register_tensors

    def stopping(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt                     # the run is stopped during its third pair
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(infer_module, "register_tensors", stopping)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        infer(_run(setting, out), setting["ckpt"], progress=False)
    assert len(list((out / "partial").glob("*.row.json"))) == 2 and not (out / "per_case.csv").exists()
    # a fresh run into that folder is refused: it would lose the stopped run's work
    with pytest.raises(DataError, match="finished pair"):
        infer(_run(setting, out), setting["ckpt"], progress=False)
    # nor may it continue with other settings, weights or data: its rows would be mixed with other ones
    with pytest.raises(DataError, match=r"eval.label_interpolation \('nearest' -> 'onehot'\)"):
        infer(_run(setting, out, **{"eval.label_interpolation": "onehot"}), setting["ckpt"], progress=False,
              resume=True)
    replaced = tmp_path / "replaced"            # other weights (compared by content, not by the path)
    replaced.mkdir()
    retrained = build_model(ModelConfig(widths=(4, 8, 16, 16, 16), num_heads=2, window_size=(2, 2, 2)))
    with pytest.raises(DataError, match="differs from this one in weights;"):
        infer(_run(setting, out), save_model(replaced / "tiny.pth", retrained), progress=False, resume=True)
    data = tmp_path / "OASIS"                              # the data set with one test image replaced
    import shutil
    shutil.copytree(setting["data"], data)
    victim = sorted((data / "Test").glob("*.nii.gz"))[-1]
    nib.save(nib.Nifti1Image(np.zeros((9, 9, 9), np.float32), AFFINE), str(victim))
    with pytest.raises(DataError, match="differs from this one in data list;"):
        infer(_run(setting, out, **{"data.root": str(data)}), setting["ckpt"], progress=False, resume=True)
    calls.clear()
    monkeypatch.setattr(infer_module, "register_tensors", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    result = infer(_run(setting, out), setting["ckpt"], progress=False, resume=True)
    assert len(calls) == 2                                  # only the two pairs not finished before
    assert _rows(out) == _rows(full)
    assert not (out / "partial").exists()
    assert result["rows"][0]["case"] == _rows(full)[0]["case"]
    # a finished run has nothing to resume: its results are kept
    before = (out / "per_case.csv").read_bytes()
    with pytest.raises(DataError, match="finished run"):
        infer(_run(setting, out), setting["ckpt"], progress=False, resume=True)
    assert (out / "per_case.csv").read_bytes() == before


@pytest.mark.parametrize("values, dtype", [((0, 3, 35), np.int16), ((0, 40000), np.int32), ((-40000, 7), np.int32),
                                           ((0, 2 ** 40), np.int64)])
def test_warped_label_maps_keep_every_label_value(tmp_path, values, dtype):
    """A label above 32767 is written in a wider integer type, never wrapped (40000 -> -25536)."""
    labels = np.zeros((4, 5, 6), np.int64)
    labels.flat[[7, 29, 61][:len(values)]] = values
    fixed = Volume(np.zeros((4, 5, 6), np.float32), AFFINE, None, "fixed.nii.gz")
    save_pair_outputs(tmp_path, "p", fixed, torch.zeros(1, 1, 4, 5, 6), torch.zeros(1, 3, 4, 5, 6),
                      torch.from_numpy(labels)[None, None])
    img = nib.load(str(tmp_path / "p_warped_label.nii.gz"))
    assert img.get_data_dtype() == dtype
    assert np.array_equal(np.asarray(img.dataobj), labels)
