"""Run the project's command-line scripts in processes of their own, without a fresh
interpreter (and a fresh ``import torch``, ~3 s) for each.

A fork server started once imports torch and the engine; every run is a new process forked
from it that runs the script as ``__main__`` with the given arguments, working folder and
environment, its standard output and error in files. The exit status is the script's (the
code of its ``SystemExit``; 1 with a printed traceback for an uncaught exception), as for
``python script.py``. The server only imports (no parallel region has run in it), so a forked
child starts its thread pools afresh, and PyTorch's allocator has not been used yet (a script
that switches on huge pages before its first tensor still gets them).
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PRELOAD = ["torch", "numpy", "scipy.ndimage", "nibabel", "engine.cli", "engine.register", "engine.compare"]
_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _exit_status(exc: SystemExit) -> int:
    """The process exit status a ``SystemExit`` gives (None: 0; a message: 1)."""
    return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1


def _run_as_main(script: str, args: list[str], cwd: str, env: dict, out: str, err: str, status: str) -> None:
    """In the child: the script as ``python script args`` run in ``cwd`` would run it. The exit
    status is also written to ``status``: the fork server's report of it can get lost (it then
    says 255) when several children end at once."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    code = 1                             # an uncaught exception: a traceback and status 1, as python prints
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc)
        raise
    finally:
        atexit._run_exitfuncs()          # what the interpreter runs at exit (a forked child skips it)
        with open(status, "w") as fh:
            fh.write(str(code))


def run_script(script: str | Path, args: list[str], cwd: str | Path = ROOT, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, script, *args], cwd=cwd, env=env, capture_output=True, text=True)``
    in a process forked from the preloaded server. ``script`` relative to the repository root."""
    script = str(ROOT / script)
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory() as folder:
        out, err, status = (os.path.join(folder, name) for name in ("stdout", "stderr", "status"))
        for path in (out, err):
            open(path, "w").close()
        child = _server().Process(target=_run_as_main, args=(script, list(args), str(cwd), env, out, err, status))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        code = child.exitcode
        if os.path.exists(status) and code >= 0:       # (a signal's negative status comes from the server)
            with open(status) as fh:
                code = int(fh.read() or code)
        with open(out) as fh_out, open(err) as fh_err:
            return subprocess.CompletedProcess([script, *args], code, fh_out.read(), fh_err.read())
