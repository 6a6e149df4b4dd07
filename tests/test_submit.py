"""records/submit.py: a record from fresh fixed-budget runs into a temporary records folder, and refusals."""
import datetime
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from conftest import ROOT
from test_verify_runs import copy_run, fresh_runs, verify

SUBMIT = Path(ROOT) / "records" / "submit.py"
VERIFY = Path(ROOT) / "records" / "verify.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three seeds of a tiny fixed-budget run, on data in a folder named like a track's data folder."""
    return fresh_runs(str(tmp_path_factory.mktemp("submit")), [1, 2, 3], data_name="tiny_char")


def records_copy(tmp_path, target, slower_row=True):
    """A temporary records folder with the real shakespeare_char track and a `tiny` track on the runs' data at
    `target`, whose README is shakespeare_char's with its track table and record rows replaced."""
    records = tmp_path / "records"
    real = (Path(ROOT) / "records" / "shakespeare_char" / "README.md").read_text()
    (records / "shakespeare_char").mkdir(parents=True)
    (records / "shakespeare_char" / "README.md").write_text(real)
    lines = real.split("\n")
    fixed = lines.index("| train data | val data | target val loss | val tokens | hardware |") + 2
    lines[fixed] = f"| `tiny_char/train_*.bin` | `tiny_char/val_*.bin` | {target:.4f} | any | any |"
    table = next(i for i, line in enumerate(lines) if line.startswith("| time | description |")) + 2
    end = next(i for i in range(table, len(lines)) if not lines[i].startswith("|"))
    row = "| 999.0 s (mean of 3) | an older, slower record | 2026-01-01 | [logs](old) | someone |"
    lines[table:end] = [row if slower_row else "| (none yet) | | | | |"]
    (records / "tiny").mkdir()
    (records / "tiny" / "README.md").write_text("\n".join(lines))
    return records


def submit(records, track, *logs, name="TinyTest", description="tiny test record", contributors="tests"):
    return subprocess.run([sys.executable, str(SUBMIT), "--records_dir", str(records), "--track", track, "--name",
                           name, "--description", description, "--contributors", contributors, *map(str, logs)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def passing_target(runs):
    """A target the runs' mean final val loss is below at p < 0.01."""
    finals = [verify.verify_log(p)["final_val_loss"] for p in runs]
    spread = max(finals) - min(finals)
    target = max(finals) + max(0.05, 20 * spread)
    assert stats.ttest_1samp(finals, round(target, 4), alternative="less").pvalue < 0.01
    return target


def test_submit_adds_a_record_and_its_row(runs, tmp_path):
    records = records_copy(tmp_path, passing_target(runs))
    r = submit(records, "tiny", *runs)
    assert r.returncode == 0, r.stdout + r.stderr
    folder = records / "tiny" / f"{datetime.date.today().isoformat()}_TinyTest"
    assert sorted(p.name for p in folder.glob("*.txt")) == ["run1.txt", "run2.txt", "run3.txt"]
    assert (folder / "run1" / "metrics.jsonl").is_file()
    readme = (folder / "README.md").read_text()
    assert "--reproduce 20" in readme and "t = " in readme
    assert f"| versions | python {platform.python_version()}, torch {torch.__version__} |" in readme
    table = (records / "tiny" / "README.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and "s (mean of" in line]
    assert len(rows) == 2 and f"[logs]({folder.name})" in rows[0] and "older, slower" in rows[1]
    assert not list((records / "tiny").glob(".*"))  # no temporary folder or README left
    check = subprocess.run([sys.executable, str(VERIFY), "--target", f"{passing_target(runs):.4f}",
                            *sorted(folder.glob("*.txt"))], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count("[metrics.jsonl checked]") == 3, check.stdout
    again = submit(records, "tiny", *runs)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_submit_refuses_another_tracks_data(runs, tmp_path):
    records = records_copy(tmp_path, passing_target(runs), slower_row=False)
    before = (records / "shakespeare_char" / "README.md").read_text()
    r = submit(records, "shakespeare_char", *runs)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "input_bin" in r.stderr and "tinyshakespeare_char/train_*.bin" in r.stderr
    assert [p.name for p in (records / "shakespeare_char").iterdir()] == ["README.md"]
    assert (records / "shakespeare_char" / "README.md").read_text() == before


def test_submit_refuses_a_mean_not_below_the_target(runs, tmp_path):
    finals = [verify.verify_log(p)["final_val_loss"] for p in runs]
    records = records_copy(tmp_path, min(finals) - 0.01, slower_row=False)
    r = submit(records, "tiny", *runs)
    assert r.returncode == 2 and "not below the target" in r.stderr and "p = " in r.stderr, r.stderr
    assert [p.name for p in (records / "tiny").iterdir()] == ["README.md"]


def test_submit_refuses_a_tampered_log(runs, tmp_path):
    records = records_copy(tmp_path, passing_target(runs), slower_row=False)
    bad = tmp_path / "bad"
    shutil.copytree(runs[0].parent, bad)
    log = bad / runs[0].name
    lines = log.read_text().split("\n")
    lines = [line for line in lines if not line.startswith("step:8/20 train_loss:")]
    log.write_text("\n".join(lines))
    r = submit(records, "tiny", log, *runs[1:])
    assert r.returncode == 2 and "fails verification: line" in r.stderr and "step:8 is missing" in r.stderr


def test_submit_refuses_copies_of_one_run(runs, tmp_path):
    """One run under two names is refused, and so is a run that a record already holds, also when renamed."""
    records = records_copy(tmp_path, passing_target(runs))
    renamed = copy_run(runs[0], tmp_path / "elsewhere", name="run9.txt")
    r = submit(records, "tiny", *runs, renamed)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert f"{renamed}: the same losses as {runs[0]}: a copy of one run under another name" in r.stderr
    assert "the same seed on the same machine prints the same losses" in r.stderr
    assert [p.name for p in (records / "tiny").iterdir()] == ["README.md"]
    assert submit(records, "tiny", *runs).returncode == 0
    before = (records / "tiny" / "README.md").read_text()
    r = submit(records, "tiny", renamed, name="Again")
    folder = records / "tiny" / f"{datetime.date.today().isoformat()}_TinyTest"
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert f"{renamed}: the same losses as {(folder / runs[0].name).resolve()}: a record already holds" in r.stderr
    assert sorted(p.name for p in (records / "tiny").iterdir()) == [folder.name, "README.md"]
    assert (records / "tiny" / "README.md").read_text() == before


def test_submitter_text_cannot_change_the_markdown(runs, tmp_path):
    """A --contributors with a newline, a heading and a '|' is one escaped cell of one row, the rows still sorted by
    time; the description is escaped in the row and the record README alike; text empty after collapsing is
    refused."""
    records = records_copy(tmp_path, passing_target(runs))
    before = (records / "tiny" / "README.md").read_text().splitlines()
    r = submit(records, "tiny", *runs, contributors="a\n## heading | b", description="*fast* [x](y) <b>")
    assert r.returncode == 0, r.stdout + r.stderr
    table = (records / "tiny" / "README.md").read_text().splitlines()
    assert len(table) == len(before) + 1
    rows = [line for line in table if line.startswith("|") and "(mean of" in line]
    assert len(rows) == 2 and "older, slower" in rows[1], rows
    assert rows[0].endswith(" | a \\#\\# heading \\| b |") and " | \\*fast\\* \\[x\\]\\(y\\) \\<b\\> | " in rows[0]
    assert not any(line.startswith("#") and "heading" in line for line in table)
    readme = next((records / "tiny").glob("*_TinyTest/README.md")).read_text().splitlines()
    assert readme[2] == "\\*fast\\* \\[x\\]\\(y\\) \\<b\\>"
    r = submit(records, "tiny", *runs, name="Blank", contributors=" \n ")
    assert r.returncode == 2 and "--contributors is empty" in r.stderr, r.stderr
