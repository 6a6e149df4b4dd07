"""records/verify.py on logs of real tiny CPU runs: tampering caught by the step grid, the outcome line and
metrics.jsonl, and --reproduce re-running a log from its embedded source; the log format the tools share."""
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import ROOT, TEXT, make_char_data, tiny_args

VERIFY = Path(ROOT) / "records" / "verify.py"
RUN_FLAGS = dict(max_iters=20, eval_interval=5, log_interval=2)


def _load_verify():
    spec = importlib.util.spec_from_file_location("records_verify_runs", VERIFY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


verify = _load_verify()


def fresh_runs(base, seeds, data_name="data"):
    """Tiny fixed-budget CPU runs (no target, so they run all max_iters steps), one per seed, on one thread so the
    shared test machine runs them quickly; returns the log paths (metrics.jsonl beside each)."""
    data = os.path.join(base, data_name)
    make_char_data(data)
    logs = os.path.join(base, "logs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in seeds:
            train_gpt.main(tiny_args(data, logs, run_id=f"run{seed}", seed=seed, **RUN_FLAGS))
    finally:
        torch.set_num_threads(threads)
    return [Path(logs) / f"run{seed}.txt" for seed in seeds]


@pytest.fixture(scope="module")
def fresh_log(tmp_path_factory):
    return fresh_runs(str(tmp_path_factory.mktemp("fresh")), [1])[0]


def run_verify(*args):
    return subprocess.run([sys.executable, str(VERIFY), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def copy_run(log, directory, text=None, metrics=True, name=None):
    """The log (edited to `text` if given) in another folder, under another file name if given, with its
    metrics.jsonl beside it or not."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / (name or log.name)
    out.write_text(text if text is not None else log.read_text())
    if metrics:
        (directory / out.stem).mkdir(exist_ok=True)
        shutil.copy(log.parent / log.stem / "metrics.jsonl", directory / out.stem / "metrics.jsonl")
    return out


def train_gpt_state():
    """'no clone' outside a git clone, else 'committed' where train_gpt.py is HEAD's and 'modified' where not."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(ROOT).resolve():
        return "no clone"
    diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "train_gpt.py"], cwd=ROOT, capture_output=True)
    return "committed" if diff.returncode == 0 else "modified"


def newest_commit_of_train_gpt():
    """The short hash of the newest commit of HEAD's history that changed train_gpt.py, or skips the test where
    train_gpt.py is not that commit's (uncommitted changes make a fresh log's source unknown code by design)."""
    state = train_gpt_state()
    if state == "modified":
        pytest.skip("train_gpt.py has uncommitted changes, so a log it writes is unknown code by design")
    if state == "no clone":
        pytest.skip("not a git clone, so no source is known")
    return subprocess.run(["git", "rev-list", "-1", "HEAD", "--", "train_gpt.py"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()[:9]


def line_index(lines, prefix):
    matches = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(matches) == 1, prefix
    return matches[0]


def test_a_real_log_matches_the_shared_patterns(tmp_path):
    """The tools read a log through train_gpt.LOG_PATTERNS: every line a real run writes after its source matches
    one (but `model saved`, which no tool reads), each line of an event matches its own pattern, and every pattern
    meets a line, so a line whose format changes without its pattern fails here. The run repeats its short data,
    writes checkpoints, misses its target, and is resumed from its last checkpoint; a second run reaches its
    target."""
    data, logs = str(tmp_path / "data"), str(tmp_path / "logs")
    make_char_data(data, text=TEXT[:700], val_fraction=0.5)
    flags = dict(max_iters=8, eval_interval=4, log_interval=2, save_every=2, val_tokens=128, warmdown_iters=2)
    train_gpt.main(tiny_args(data, logs, run_id="lines", **flags))
    checkpoint = glob.glob(os.path.join(logs, "lines", "checkpoint_*.pt"))[0]
    payload = train_gpt.read_checkpoint(checkpoint)
    payload["finished"] = False  # as if the run had been interrupted, so that it can be resumed
    train_gpt.atomic_save(payload, checkpoint)
    train_gpt.main(tiny_args(data, logs, run_id="lines", resume=checkpoint, **flags))
    train_gpt.main(tiny_args(data, logs, run_id="reached", target_val_loss=100, **flags))
    lines = []
    for run in ("lines", "reached"):
        text = Path(logs, f"{run}.txt").read_text().split("\n")
        lines += text[text.index(train_gpt.LOG_SEPARATOR) + 1:]
    patterns, met = train_gpt.LOG_PATTERNS, set()
    own = {"step:": {"step"}, "data: ": {"data_pass"}, "checkpoint ": {"checkpoint"}, "resume from ": {"resume"},
           "target val_loss ": {"reached", "not_reached"}, "code_sha256:": {"code_sha256"}, "python:": {"versions"},
           "cpu: ": {"cpu"}}
    for line in filter(None, lines):
        names = {name for name, pattern in patterns.items() if pattern.match(line)}
        assert names or line.startswith("model saved "), line
        for start, expected in own.items():
            assert not line.startswith(start) or names & expected, (line, expected)
        met |= names
    assert met == set(patterns)


def test_fresh_log_verifies_with_its_metrics(fresh_log):
    r = verify.verify_log(fresh_log)
    assert r["ok"], r["reason"]
    assert r["metrics"] is not None and r["budget"] == "fixed" and r["step"] == 20


def edit_loss(line, delta):
    value = re.search(r"_loss:(\d+\.\d+)", line).group(1)
    return line.replace(f"_loss:{value}", f"_loss:{float(value) + delta:.4f}")


TAMPERING = ["final_val", "middle_val_digit", "train_deleted", "val_deleted"]


def tamper(log, case):
    """The log's lines with one tampering, and the line number verify.py must name."""
    lines = log.read_text().split("\n")
    if case == "final_val":  # the last val line, also the best: the outcome line names it
        i = line_index(lines, "step:20/20 val_loss:")
        lines[i] = edit_loss(lines[i], -0.001)
    elif case == "middle_val_digit":
        i = line_index(lines, "step:10/20 val_loss:")
        lines[i] = edit_loss(lines[i], 0.0001)
    elif case == "train_deleted":  # then the line named is the next step line, which the deleted one should precede
        i = line_index(lines, "step:8/20 train_loss:")
        del lines[i]
    else:
        i = line_index(lines, "step:10/20 val_loss:")
        del lines[i]
    return "\n".join(lines), i + 1


@pytest.mark.parametrize("case", TAMPERING)
@pytest.mark.parametrize("with_metrics", [True, False])
def test_tampering_refused_naming_the_line(fresh_log, tmp_path, case, with_metrics):
    text, wrong = tamper(fresh_log, case)
    r = verify.verify_log(copy_run(fresh_log, tmp_path / "copy", text, metrics=with_metrics))
    if case == "middle_val_digit" and not with_metrics:  # no trace left without the full-precision numbers
        assert r["ok"], r["reason"]
        return
    assert not r["ok"]
    assert r["reason"].startswith(f"line {wrong}:"), r["reason"]


def test_tampering_cli_one_fail_line_each(fresh_log, tmp_path):
    logs, wrong = [], {}
    for case in TAMPERING:
        text, wrong[case] = tamper(fresh_log, case)
        logs.append(copy_run(fresh_log, tmp_path / case, text))
    r = run_verify("--no-stats", *logs)
    assert r.returncode == 1, r.stdout
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 4
    for case, line in zip(TAMPERING, fails):
        assert f"/{case}/" in line and f": line {wrong[case]}:" in line, line


def test_metrics_dir_flag(fresh_log, tmp_path):
    """--metrics_dir DIR checks a log kept elsewhere (a record folder) against DIR/<run_id>/metrics.jsonl."""
    lines = fresh_log.read_text().split("\n")
    i = line_index(lines, "step:10/20 val_loss:")
    lines[i] = edit_loss(lines[i], 0.0001)
    log = copy_run(fresh_log, tmp_path / "record", "\n".join(lines), metrics=False)
    assert verify.verify_log(log)["ok"]
    r = run_verify(log, "--no-stats", "--metrics_dir", fresh_log.parent)
    assert r.returncode == 1 and f"line {i + 1}: val_loss:" in r.stdout, r.stdout
    r = run_verify(log, "--no-stats", "--metrics_dir", tmp_path)
    assert r.returncode == 1 and "no <run_id>/metrics.jsonl" in r.stdout, r.stdout


def test_reproduce_matches_a_fresh_log_and_catches_a_changed_loss(fresh_log, tmp_path):
    lines = fresh_log.read_text().split("\n")
    i = line_index(lines, "step:6/20 train_loss:")
    logged = lines[i].split()[1]
    lines[i] = edit_loss(lines[i], 0.0001)
    changed = copy_run(fresh_log, tmp_path / "changed", "\n".join(lines), metrics=False)
    assert verify.verify_log(changed)["ok"]  # only a re-run can tell
    r = run_verify("--reproduce", 20, "--no-stats", "--run-unknown-code", fresh_log, changed)
    assert r.returncode == 1, r.stdout + r.stderr
    done = [line for line in r.stdout.splitlines() if line.startswith("REPRODUCED")]
    assert len(done) == 1 and str(fresh_log) in done[0], r.stdout
    assert "15 losses at steps <= 20 match (exact, same machine" in done[0]
    mismatch = [line for line in r.stdout.splitlines() if line.startswith("MISMATCH")]
    assert len(mismatch) == 1 and str(changed) in mismatch[0], r.stdout
    assert f"line {i + 1}: logged step:6/20 {lines[i].split()[1]}, reproduced {logged}" in mismatch[0]


def with_source(log, text_of_source):
    """The log's text with its embedded source replaced by text_of_source and code_sha256 to match."""
    text = log.read_text()
    head, tail = text.split("\n" + train_gpt.LOG_SEPARATOR + "\n", 1)
    sha = hashlib.sha256(text_of_source.encode()).hexdigest()
    tail = re.sub(r"^code_sha256:[0-9a-f]{64}", f"code_sha256:{sha}", tail)
    return text_of_source + train_gpt.LOG_SEPARATOR + "\n" + tail


def test_reproduce_runs_unknown_code_only_when_asked_and_then_in_a_child_process(fresh_log, tmp_path):
    """A log whose source is not a known train_gpt.py is refused with a diff summary, nothing run; with
    --run-unknown-code it runs in another process (the added line writes its pid) and reproduces."""
    commit = newest_commit_of_train_gpt()
    source = fresh_log.read_text().split("\n" + train_gpt.LOG_SEPARATOR + "\n")[0] + "\n"
    assert hashlib.sha256(source.encode()).hexdigest() == hashlib.sha256(
        (Path(ROOT) / "train_gpt.py").read_bytes()).hexdigest()
    marker = tmp_path / "ran_in_pid"
    lines = source.split("\n")
    at = line_index(lines, "import numpy as np")
    lines.insert(at, f"open({str(marker)!r}, 'w').write(str(os.getpid()))")
    log = copy_run(fresh_log, tmp_path / "unknown", with_source(fresh_log, "\n".join(lines)), metrics=False)
    assert verify.verify_log(log)["ok"]
    r = run_verify("--reproduce", 6, "--no-stats", log)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert f"{log}: not run: its source is not a known train_gpt.py" in r.stderr
    assert f"against the closest, train_gpt.py at commit {commit}, it adds 1 line(s) and removes 0, in 1 place(s) " \
           f"(its lines {at + 1}-{at + 1})" in r.stderr and "--run-unknown-code" in r.stderr
    assert not marker.exists()
    proc = subprocess.Popen([sys.executable, str(VERIFY), "--reproduce", "6", "--no-stats", "--run-unknown-code",
                             str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert f"source {log}: not a known train_gpt.py" in out and "REPRODUCED" in out
    assert int(marker.read_text()) not in (proc.pid, os.getpid())


def test_reproduce_names_the_known_source_it_runs(fresh_log):
    commit = newest_commit_of_train_gpt()
    r = run_verify("--reproduce", 2, "--no-stats", fresh_log)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"source {fresh_log}: identical to train_gpt.py at commit {commit}" in r.stdout


def test_reproduce_without_the_data_exit_2(fresh_log, tmp_path):
    text = fresh_log.read_text()
    data_line = next(line for line in text.split("\n") if line.startswith("input_bin: "))
    moved = data_line.replace("input_bin: ", "input_bin: /nonexistent/tinyshakespeare_char_gone/")
    log = copy_run(fresh_log, tmp_path / "nodata", text.replace(data_line, moved), metrics=False)
    r = run_verify("--reproduce", 5, "--no-stats", "--run-unknown-code", log)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "input_bin /nonexistent/" in r.stderr and "matches no file" in r.stderr and "data/" in r.stderr


def test_reproduce_elsewhere_allows_the_tolerance(fresh_log, tmp_path):
    """A log from another CPU is compared within min(0.001 + 0.00015 x step, 0.05): a 0.0005 change at step 6 passes
    (0.0019 allowed there), a 0.01 change does not."""
    text = fresh_log.read_text()
    cpu = next(line for line in text.split("\n") if line.startswith("cpu: "))
    lines = text.replace(cpu, "cpu: Another CPU (64 logical cores, torch threads 1)").split("\n")
    i = line_index(lines, "step:6/20 train_loss:")
    logs = []
    for delta in (0.0005, 0.01):
        changed = list(lines)
        changed[i] = edit_loss(lines[i], delta)
        logs.append(copy_run(fresh_log, tmp_path / f"delta{delta}", "\n".join(changed), metrics=False))
    r = run_verify("--reproduce", 6, "--no-stats", "--run-unknown-code", *logs)
    assert r.returncode == 1, r.stdout + r.stderr
    out = [line for line in r.stdout.splitlines() if line.startswith(("REPRODUCED", "MISMATCH"))]
    assert len(out) == 2 and out[0].startswith("REPRODUCED") and out[1].startswith("MISMATCH"), r.stdout
    assert all("within min(0.001 + 0.00015 x step, 0.05); the log's CPU is 'Another CPU'" in line for line in out)


def test_a_lowered_train_time_is_refused_without_metrics(fresh_log, tmp_path):
    """Every train_time halved, the outcome line's too, so that they still agree: step_avg gives it away."""
    lines = fresh_log.read_text().split("\n")
    separator = lines.index(train_gpt.LOG_SEPARATOR)
    halve = lambda m: f"train_time:{int(m.group(1)) // 2}ms"  # noqa: E731
    lines[separator:] = [re.sub(r"train_time:(\d+)ms", halve, line) for line in lines[separator:]]
    first = next(i for i, line in enumerate(lines) if re.match(r"step:[1-9]\d*/", line))
    r = verify.verify_log(copy_run(fresh_log, tmp_path / "copy", "\n".join(lines), metrics=False))
    assert not r["ok"] and r["reason"].startswith(f"line {first + 1}: step_avg "), r["reason"]
    out = run_verify("--no-stats", copy_run(fresh_log, tmp_path / "plain", metrics=False)).stdout
    assert "[no metrics.jsonl: the printed numbers are checked only against each other]" in out


def test_the_known_sources_are_heads_versions_of_train_gpt_and_its_committed_records():
    state = train_gpt_state()
    if state == "no clone":
        pytest.skip("not a git clone, so no source is known")
    known = verify.known_sources()
    commits = subprocess.run(["git", "rev-list", "HEAD", "--", "train_gpt.py"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    own = hashlib.sha256((Path(ROOT) / "train_gpt.py").read_bytes()).hexdigest()
    if state == "committed":
        assert known[own][0] == f"train_gpt.py at commit {commits[0][:9]}"
    assert all(where.startswith(("train_gpt.py at commit ", "the source of records/")) for where, _ in known.values())
    tracked = subprocess.run(["git", "ls-files", "records"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for path in (p for p in tracked if p.endswith(".txt")):
        text = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, text=True).stdout
        if "\n" + train_gpt.LOG_SEPARATOR + "\n" in text:
            source = text.split("\n" + train_gpt.LOG_SEPARATOR + "\n")[0] + "\n"
            assert hashlib.sha256(source.encode()).hexdigest() in known, path
    if len(commits) < 2:
        pytest.skip("no git history of train_gpt.py here (a shallow clone)")
    old = subprocess.run(["git", "show", f"{commits[-1]}:train_gpt.py"], cwd=ROOT, capture_output=True).stdout
    assert known[hashlib.sha256(old).hexdigest()][0] == f"train_gpt.py at commit {commits[-1][:9]}"


def git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=repo, capture_output=True, text=True, check=True).stdout


def test_known_sources_are_what_head_commits(tmp_path):
    """An untracked log under records/ is not known; committed, its source is; edited in the working tree, its
    committed source still is and the edit is not; the same for train_gpt.py; nothing is known outside a clone."""
    def sha(text):
        return hashlib.sha256(text.encode()).hexdigest()

    def log_of(source):
        return f"{source}{train_gpt.LOG_SEPARATOR}\ncode_sha256:{sha(source)}\n"
    repo = tmp_path / "repo"
    repo.mkdir()
    assert verify.known_sources(repo) == {}
    git(repo, "init", "-q")
    (repo / "train_gpt.py").write_text("print('v1')\n")
    git(repo, "add", "train_gpt.py")
    git(repo, "commit", "-q", "-m", "v1")
    first = git(repo, "rev-parse", "HEAD").strip()[:9]
    assert verify.known_sources(repo) == {sha("print('v1')\n"): (f"train_gpt.py at commit {first}", "print('v1')\n")}
    (repo / "train_gpt.py").write_text("print('v2')\n")
    log = repo / "records" / "tiny" / "2026-01-01_New" / "run.txt"
    log.parent.mkdir(parents=True)
    log.write_text(log_of("print('s1')\n"))
    known = verify.known_sources(repo)
    assert set(known) == {sha("print('v1')\n")}
    git(repo, "add", "records")
    git(repo, "commit", "-q", "-m", "a record")
    assert verify.known_sources(repo)[sha("print('s1')\n")][0] == \
        "the source of records/tiny/2026-01-01_New/run.txt as committed"
    log.write_text(log_of("print('s2')\n"))
    assert set(verify.known_sources(repo)) == {sha("print('v1')\n"), sha("print('s1')\n")}
    assert verify.known_sources(repo / "records") == {}  # a folder inside a clone is not one
    is_known, identity = verify.source_identity(verify.parse_log(log_of("print('s1')\n")), {})
    assert not is_known and "no source is known here (not a git clone, or no git)" in identity


def test_copies_of_a_record_run_fail_under_another_name(fresh_log, tmp_path, monkeypatch, capsys):
    """A log with the losses of a log under records/ fails, naming it, wherever it is and whatever its name; the
    record's log itself verifies."""
    root = tmp_path / "checkout"
    record = copy_run(fresh_log, root / "records" / "tiny" / "2026-01-01_Old")
    renamed = copy_run(fresh_log, tmp_path / "mine", name="mine.txt")
    monkeypatch.setattr(verify, "ROOT", root.resolve())
    assert verify.main(["--no-stats", str(record)]) == 0
    assert verify.main(["--no-stats", str(renamed)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {renamed}: the same losses as records/tiny/2026-01-01_Old/{fresh_log.name}, a run a record " \
           "already holds" in out and "the same seed on the same machine prints the same losses" in out, out


def forged_times(log, directory, scale):
    """A copy of the log and its metrics.jsonl with every train time scaled by `scale` and each step_avg recomputed,
    so that plain verification passes."""
    rows = [json.loads(line) for line in (log.parent / log.stem / "metrics.jsonl").read_text().splitlines()]
    times = {}
    for row in rows:
        row["train_time_ms"] = float(round(row["train_time_ms"] * scale))
        times[("val" if "val_loss" in row else "train", row["step"])] = int(row["train_time_ms"])
    lines = log.read_text().split("\n")
    for i in range(lines.index(train_gpt.LOG_SEPARATOR), len(lines)):
        m = re.match(r"step:(\d+)/\d+ (train|val)_loss:", lines[i])
        if m and int(m.group(1)) > 0:
            step, t = int(m.group(1)), times[(m.group(2), int(m.group(1)))]
            fields = f"train_time:{t}ms step_avg:{t / step:.2f}ms"
            lines[i] = re.sub(r"train_time:\d+ms step_avg:\S+ms", fields, lines[i])
    out = copy_run(log, directory, "\n".join(lines), metrics=False)
    (directory / log.stem).mkdir()
    (directory / log.stem / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def test_reproduce_flags_train_times_far_below_the_reproduction(fresh_log, tmp_path, monkeypatch, capsys):
    """On the same hardware a log whose train times are a tenth of the real ones (metrics.jsonl and step_avg to
    match) verifies, but its reproduction flags them and fails; the honest log is flagged only against a reproduction
    more than TIME_NOISE slower. Under TIME_MIN_MS of reproduced time the times are shown but not judged (the limit
    set here: a tiny run's times vary too much)."""
    forged = forged_times(fresh_log, tmp_path / "forged", 0.1)
    r = verify.verify_log(forged)
    assert r["ok"] and r["metrics"], r["reason"]
    flags = ["--no-stats", "--reproduce", "20", "--run-unknown-code"]
    monkeypatch.setattr(verify, "TIME_MIN_MS", 10 ** 9)  # more than any reproduction here, however busy the machine
    assert verify.main(flags + [str(forged)]) == 0
    out = capsys.readouterr().out
    shown = re.escape(str(forged))
    assert re.search(rf"time {shown}: logged \d+ms at step:20, reproduced \d+ms \(\d+\.\d\dx\); not judged: the "
                     rf"reproduction ran under {verify.TIME_MIN_MS}ms", out), out
    monkeypatch.setattr(verify, "TIME_MIN_MS", 0)
    assert verify.main(flags + [str(forged)]) == 1
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and re.search(rf"FLAG {shown}: the logged train time is \d+% below the reproduction "
                                             rf"on the same hardware, more than the {verify.TIME_NOISE:.0%} noise "
                                             "allowed", out), out
    # The honest log against reproductions that took as long or longer, within the noise and beyond it (this tiny
    # run's own reproduction can take several times as long on a machine busy for a moment).
    parsed = verify.parse_log(fresh_log.read_text())
    for scale, flagged in [(1.0, False), (1 / (1 - verify.TIME_NOISE / 2), False),
                           (1 / (1 - verify.TIME_NOISE * 1.5), True)]:
        reproduction = forged_times(fresh_log, tmp_path / f"reproduced_{scale:.2f}", scale).read_text().split("\n")
        phrase, flag = verify._compare_time(parsed, reproduction, 20, "")
        assert phrase.startswith("logged ") and (flag is not None) == flagged, (scale, phrase, flag)


def test_a_screened_validation_is_never_the_best(tmp_path):
    """A run whose validations before the last stop at their screen (a target too low to reach) verifies, its
    best being its last, full validation. Edited so a screen printed less than that best, it still verifies; with
    that line's screen_tokens field removed, the line is below the best and refused."""
    data, logs = str(tmp_path / "data"), str(tmp_path / "logs")
    make_char_data(data)
    train_gpt.main(tiny_args(data, logs, run_id="screened", target_val_loss=0.5, val_screen_tokens=128, **RUN_FLAGS))
    log = Path(logs, "screened.txt")
    assert verify.verify_log(log)["ok"], verify.verify_log(log)["reason"]
    lines = log.read_text().split("\n")
    screens = [i for i, line in enumerate(lines) if line.endswith(" screen_tokens:128")]
    assert [int(re.match(r"step:(\d+)", lines[i]).group(1)) for i in screens] == [0, 5, 10, 15]
    losses = {i: float(re.search(r"val_loss:(\S+)", lines[i]).group(1)) for i in screens}
    lowest = min(screens, key=losses.get)
    above = f"{losses[lowest] + 0.01:.4f}"
    final, outcome = line_index(lines, "step:20/20 val_loss:"), line_index(lines, "target val_loss ")
    lines[final] = re.sub(r"val_loss:\S+", f"val_loss:{above}", lines[final])
    lines[outcome] = re.sub(r"best val_loss \S+", f"best val_loss {above}", lines[outcome])
    r = verify.verify_log(copy_run(log, tmp_path / "edited", "\n".join(lines), metrics=False))
    assert r["ok"], r["reason"]
    lines[lowest] = lines[lowest].replace(" screen_tokens:128", "")
    r = verify.verify_log(copy_run(log, tmp_path / "unmarked", "\n".join(lines), metrics=False))
    assert not r["ok"] and f"line {lowest + 1}:" in r["reason"] and "is below the best val_loss" in r["reason"]
