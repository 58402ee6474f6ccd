"""The main job, README command 1, in --quick mode: data built, trained, evaluated, drawn."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--quick", "--minutes", "0.3", "--no-progress",
                          "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Dice (initial)" in out.stdout and "| 2 |" in out.stdout
    for name in ("registration", "deformation_grid", "jacobian", "dice_per_structure", "training_curves"):
        png = tmp_path / "out" / "figures" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 10_000
    assert (tmp_path / "out" / "summary.json").is_file() and (tmp_path / "data" / "DONE").is_file()
    # the main job's result (network, then 50 instance-optimisation steps) beats the initial alignment
    net = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]
    final = json.loads((tmp_path / "out" / "with_io" / "summary.json").read_text())["summary"]
    assert final["dice"]["mean"] > final["dice_initial"]["mean"] + 0.05
    assert final["dice_before_io"]["mean"] == net["dice"]["mean"]
    assert final["pct_nonpos_jac"]["mean"] < 0.5
