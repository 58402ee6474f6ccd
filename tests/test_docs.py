"""Docs that cannot rot: every `python <script> ...` command in the README and the docs names a
script of this repository whose command line accepts every flag the command gives."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.forked_scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
# scripts of other projects that the docs show beside ours (not in this repository)
EXTERNAL = {"evaluation.py"}
_COMMAND = re.compile(r"(?:python3?|torchrun(?:\s+--\S+)*)\s+((?:[\w.-]+/)*[\w.-]+\.py)\b(.*)")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])(?![\w-])")


def _logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (a trailing backslash) joined."""
    out, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return out


def commands(docs=None) -> list[tuple[str, str, list[str]]]:
    """(where, script, flags) of every script command in the docs."""
    found = []
    for doc in docs or DOCS:
        for number, line in enumerate(_logical_lines(doc.read_text()), start=1):
            for part in re.split(r"`", line):
                part = part.split(" # ")[0].split("  #")[0]
                for match in _COMMAND.finditer(part):
                    script, rest = match.group(1), match.group(2)
                    rest = re.sub(r"\"[^\"]*\"|'[^']*'", " ", rest)      # quoted values are values
                    rest = re.split(r"\s(?:&&|\|\||;|\|)\s", rest)[0]   # up to the next shell command
                    flags = [f for f in _FLAG.findall(rest)]
                    found.append((f"{doc.name}:{number}", script, flags))
    return found


def test_the_docs_show_commands_at_all():
    scripts = {script for _, script, _ in commands()}
    assert {"demo.py", "register.py", "warp.py", "Train_OASIS.py", "Infer_OASIS.py",
            "scripts/convert_released.py"} <= scripts


def _help(script: str) -> str:
    proc = run_script(script, ["--help"], cwd=ROOT, timeout=120)
    assert proc.returncode == 0, f"{script} --help failed: {proc.stderr[-500:]}"
    return proc.stdout


def test_every_documented_command_names_a_script_and_flags_it_accepts():
    found = commands()
    scripts = sorted({script for _, script, _ in found if Path(script).name not in EXTERNAL})
    missing = [f"{where}: {script} does not exist" for where, script, _ in found
               if Path(script).name not in EXTERNAL and not (ROOT / script).is_file()]
    assert not missing, "\n".join(missing)
    with ThreadPoolExecutor(2) as pool:
        helps = dict(zip(scripts, pool.map(_help, scripts)))
    problems = []
    for where, script, flags in found:
        if script not in helps:
            continue
        accepted = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", helps[script]))
        unknown = [f for f in flags if f not in accepted]
        if unknown:
            problems.append(f"{where}: {script} does not accept {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, script, flags", [
    ("python warp.py --input a.nii.gz -t x.txt --label  # a comment --not-a-flag", "warp.py",
     ["--input", "-t", "--label"]),
    ("torchrun --nproc_per_node=4 Infer_OASIS.py --device cuda", "Infer_OASIS.py", ["--device"]),
    ("python register.py --set 'train.lr=1e-4 --x' --out-dir o && python -m pytest -q", "register.py",
     ["--set", "--out-dir"]),
])
def test_the_command_reader_itself(tmp_path, line, script, flags):
    doc = tmp_path / "d.md"
    doc.write_text(f"```bash\n{line}\n```\n")
    assert [(s, f) for _, s, f in commands([doc])] == [(script, flags)]


def test_every_relative_link_in_the_docs_points_to_a_file():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)
