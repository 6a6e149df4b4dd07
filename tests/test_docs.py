"""The READMEs stay honest where a test can tell: every command they show names a script that exists and flags
that script accepts, every file they name exists, the top-level track table shows each track's current record,
and the record tools stay within 50 lines a function."""
import ast
import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

ROOT = Path(ROOT)
DOCS = ["README.md", "records/README.md", "bench/README.md",
        *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("records/*/README.md")),
        *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("records/*/*/README.md"))]
RECORD_TOOLS = ["records/verify.py", "records/submit.py", "records/plot.py"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"^(records|bench|data|tests|\.ci)/[\w./*<>-]*$|^[\w-]+\.(py|sh|md|txt)$")


def commands(doc):
    """The shell commands a document shows: each line of its bash blocks (continuations joined, comments dropped)
    and each inline code span that starts like a command."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    found = []
    for lang, body in FENCE.findall(text):
        if lang == "bash":
            found += [line.split(" #")[0].strip() for line in body.replace("\\\n", " ").splitlines()
                      if line.strip() and not line.lstrip().startswith("#")]
    found += [span for span in SPAN.findall(text) if re.match(r"(python|torchrun|\./run\.sh) ", span)]
    return found


def script_and_flags(command):
    """(script path, its --flags) of a command that runs one of the project's scripts, else None."""
    words = [w for w in shlex.split(command) if not re.match(r"^[A-Z_]+=", w)]
    if words[0] == "python" and not words[1].startswith("-"):
        script, args = words[1], words[2:]
    elif words[0] == "torchrun":
        at = next(i for i, w in enumerate(words) if w.endswith(".py"))
        script, args = words[at], words[at + 1:]
    elif words[0] == "./run.sh":
        script, args = "train_gpt.py", words[1:]  # run.sh passes its flags through to train_gpt.py
    else:
        return None
    return script, args


SHOWN = sorted({(doc, c) for doc in DOCS for c in commands(doc) if script_and_flags(c)})


@pytest.fixture(scope="module")
def helps():
    """Each shown script's --help, the scripts run side by side."""
    scripts = sorted({script_and_flags(c)[0] for _, c in SHOWN if (ROOT / script_and_flags(c)[0]).is_file()})
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for s in scripts}
    return {s: p.communicate(timeout=120)[0] for s, p in procs.items()}


def test_the_documents_show_commands():
    assert len(SHOWN) > 40 and {doc for doc, _ in SHOWN} >= {"README.md", "records/README.md", "bench/README.md"}


@pytest.mark.parametrize("doc,command", SHOWN)
def test_a_shown_command_names_a_script_and_flags_that_exist(doc, command, helps):
    script, args = script_and_flags(command)
    assert (ROOT / script).is_file(), f"{doc}: `{command}` runs {script}, which does not exist"
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(re.escape(flag) + r"\b", helps[script]), f"{doc}: {script} has no {flag} (`{command}`)"
    for path in (a for a in args if REPO_PATH.match(a) and a.startswith(("records/", "bench/")) and "<" not in a):
        assert glob.glob(str(ROOT / path)), f"{doc}: `{command}` names {path}, which does not exist"


@pytest.mark.parametrize("doc", DOCS)
def test_the_files_a_document_names_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    here = (ROOT / doc).parent
    missing = [link for link in LINK.findall(text)
               if "://" not in link and not (here / link.split("#")[0]).exists()]
    for span in SPAN.findall(text):
        generated = span.startswith(("data/", "logs/")) and not span.endswith(".py")
        if REPO_PATH.match(span) and "<" not in span and "/" in span and not generated:
            if not glob.glob(str(ROOT / span)):
                missing.append(span)
    assert not missing, f"{doc} names files that do not exist: {missing}"


def top_record(track_readme):
    """The first row of a track README's record table, as (time cell, folder) or ('(none yet)', None)."""
    lines = track_readme.read_text(encoding="utf-8").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| time | description |")) + 2
    cells = [c.strip() for c in lines[first].strip("|").split("|")]
    folder = LINK.search(lines[first])
    return cells[0], folder.group(1) if folder else None


@pytest.mark.parametrize("track", sorted(p.parent.name for p in ROOT.glob("records/*/README.md")))
def test_the_readme_shows_each_tracks_current_record(track):
    row = next((line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith(f"| [`{track}`]")), None)
    assert row, f"README.md's track table has no row for {track}"
    time, folder = top_record(ROOT / "records" / track / "README.md")
    assert time in row and (folder is None or f"records/{track}/{folder}" in row), (row, time, folder)


@pytest.mark.parametrize("tool", RECORD_TOOLS)
def test_the_record_tools_stay_within_50_lines_a_function(tool):
    tree = ast.parse((ROOT / tool).read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50]
    assert not long, f"{tool}: {', '.join(long)}"


def test_records_holds_only_tracks_and_the_record_tools():
    tracked = subprocess.run(["git", "ls-files", "records"], cwd=ROOT, capture_output=True, text=True).stdout
    top = {Path(p).parts[1] for p in tracked.split()} if tracked else set(os.listdir(ROOT / "records"))
    tracks = {p.parent.name for p in ROOT.glob("records/*/README.md")}
    assert top <= tracks | {"README.md", "verify.py", "submit.py", "plot.py"}, top - tracks
