"""The forked script runner of the tests answers as a fresh interpreter does."""
import subprocess
import sys

import pytest

from tests.forked_scripts import run_script

SCRIPT = """
import atexit, os, sys
atexit.register(lambda: open("exited", "w").close())
print("argv", sys.argv[1:], "cwd", os.path.basename(os.getcwd()), "env", os.environ.get("PROBE"))
print("to stderr", file=sys.stderr)
if __name__ != "__main__":
    raise SystemExit(7)
mode = sys.argv[1]
if mode == "raise":
    raise RuntimeError("boom")
if mode == "exit":
    sys.exit(2)
if mode == "message":
    sys.exit("bye")
"""


@pytest.mark.parametrize("mode", ["raise", "exit", "message", "plain"])
def test_same_status_output_and_exit_handlers_as_a_fresh_interpreter(tmp_path, mode):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    answers = []
    for name, runner in (("fresh", lambda cwd, env: subprocess.run([sys.executable, str(script), mode, "x y"], cwd=cwd,
                                                                    env=env, capture_output=True, text=True)),
                         ("forked", lambda cwd, env: run_script(script, [mode, "x y"], cwd=cwd, env=env))):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = runner(cwd, {"PATH": "/usr/bin:/bin", "PROBE": name})
        answers.append((proc.returncode, proc.stdout.replace(name, "*"), proc.stderr.replace(str(script), "*"),
                        (cwd / "exited").exists()))
    fresh, forked = answers
    assert forked[0] == fresh[0] == {"raise": 1, "exit": 2, "message": 1, "plain": 0}[mode]
    assert forked[1] == fresh[1] and forked[3] and fresh[3]
    assert "to stderr" in forked[2] and ("Traceback" in forked[2]) == ("Traceback" in fresh[2]) == (mode == "raise")
    assert fresh[2].strip().splitlines()[-1] == forked[2].strip().splitlines()[-1]
