"""compare.py: several methods on the same pairs, tables, per-case CSVs, p-values, skips."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import compare as compare_script
from engine.compare import parse_method
from engine.train import Trainer
from tests.forked_scripts import run_script
from tests.layouts import quick_overrides, write_oasis
from utils.config import ModelConfig, apply_override, preset
from utils.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    root = write_oasis(d / "OASIS", n_train=4, n_test=6)
    run = preset("OASIS")
    for o in quick_overrides("OASIS"):
        apply_override(run, o)
    run.data.root, run.checkpoint_dir, run.device = str(root), str(d / "ck"), "cpu"
    run.train.epochs, run.train.max_pairs = 1, 2
    Trainer(run, progress=False).fit()
    return root, d / "ck" / "last.pth"


def _args(root, out, *methods):
    sets = [a for o in quick_overrides("OASIS") for a in ("--set", o)]
    return ["--dataset", "OASIS", "--data-root", str(root), "--output-dir", str(out), "--no-progress",
            *sets, *[a for m in methods for a in ("--method", m)]]


def test_table_per_case_files_and_pvalues_match_scipy(trained, tmp_path, monkeypatch, capsys):
    root, ck = trained
    monkeypatch.setitem(sys.modules, "ants", None)            # SyN unavailable: skipped with a message
    out = tmp_path / "out"
    rc = compare_script.main(_args(root, out, "Initial=initial", f"PLCReg=checkpoint:{ck}",
                                   f"PLCReg+IO=checkpoint:{ck}:io=5", "SyN=syn", "Again=initial"))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "skipped SyN" in printed and "antspyx" in printed
    table = _read(out / "comparison.csv")
    assert [r["method"] for r in table] == ["Initial", "PLCReg", "PLCReg+IO", "Again"]
    assert float(table[1]["parameters"]) > 0 and table[0]["parameters"] == "0"
    per_case = {m: _read(out / f"per_case_{m}.csv") for m in ("Initial", "PLCReg", "PLCReg+IO", "Again")}
    assert all(len(rows) == 6 for rows in per_case.values())
    assert [r["case"] for r in per_case["Initial"]] == [r["case"] for r in per_case["PLCReg"]]
    pvals = _read(out / "pvalues.csv")
    assert {r["reference"] for r in pvals} == {"PLCReg"}         # first non-initial method
    assert {(r["method"], r["metric"]) for r in pvals} == {(m, k) for m in ("Initial", "PLCReg+IO", "Again")
                                                          for k in ("Dice", "HD95")}
    for r in pvals:
        key = "dice" if r["metric"] == "Dice" else "hd95"
        a = np.array([float(x[key]) for x in per_case["PLCReg"]])
        b = np.array([float(x[key]) for x in per_case[r["method"]]])
        if np.all(a == b):
            assert float(r["p"]) == 1.0
        else:
            assert float(r["p"]) == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-9)
    for name in ("comparison.md", "pvalues.md", "figures/pvalues.png", "figures/dice_per_structure.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0


def test_identical_methods_are_not_significant(trained, tmp_path):
    root, ck = trained
    out = tmp_path / "same"
    assert compare_script.main(_args(root, out, f"A=checkpoint:{ck}", f"B=checkpoint:{ck}")) == 0
    for r in _read(out / "pvalues.csv"):
        assert float(r["p"]) == 1.0 and "identical" in r["note"]


def test_missing_voxelmorph_package_is_skipped_not_a_traceback(trained, tmp_path, monkeypatch, capsys):
    root, _ = trained
    ck = save_checkpoint(tmp_path / "vxm.pth", ModelConfig(arch="voxelmorph", widths=(16, 32, 32, 32, 32)).to_dict(), {})
    monkeypatch.setitem(sys.modules, "voxelmorph", None)
    assert compare_script.main(_args(root, tmp_path / "o", "Initial=initial", f"VoxelMorph=checkpoint:{ck}")) == 0
    assert "skipped VoxelMorph" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["PLCReg", "X=magic", "X=checkpoint", "X=io:zero"])
def test_bad_method_specs_are_refused(text):
    with pytest.raises(ValueError):
        parse_method(text)


def test_bad_method_on_the_command_line_exits_2(tmp_path):
    r = run_script("compare.py", ["--method", "X=magic"], cwd=ROOT)
    assert r.returncode == 2 and "unknown kind 'magic'" in r.stderr and "Traceback" not in r.stderr
