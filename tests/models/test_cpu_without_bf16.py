"""The network-level tests once more as a CPU without native bf16 would run them.

``PLCREG_CPU_BF16=0`` makes this CPU count as one without native bf16 (the capability every
skip, ``--amp`` and the backend ask), and ``ONEDNN_MAX_CPU_ISA=AVX2`` keeps oneDNN to the
instructions of an AVX2-only CPU, so its bf16 kernels would fail as they do there: the
suite must skip what needs them and pass the rest. On a CPU without bf16 this is the same
run as the suite's own, and is skipped.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.backend import CPU_BF16_ENV, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[2]
NETWORK_LEVEL = ["tests/models/test_backend.py", "tests/models/kernels", "tests/models/test_blocks.py",
                 "tests/models/test_polaca.py", "tests/engine/test_cpu_bf16.py"]


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU already runs the suite without native bf16")
def test_network_level_tests_pass_as_an_avx2_only_cpu():
    env = {**os.environ, CPU_BF16_ENV: "0", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *NETWORK_LEVEL],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "passed" in out.stdout and " failed" not in out.stdout
    assert "no native bf16" in out.stdout            # the bf16 kernel tests skipped, with the reason
