"""Tests for records/verify.py and records/plot.py on synthetic run logs."""

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "records"
VERIFY = RECORDS / "verify.py"
PLOT = RECORDS / "plot.py"
SEP = "=" * 100
TARGET = 1.88


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


verify = _load("records_verify", VERIFY)


# ---------------------------------------------------------------- log writers

FAKE_SOURCE = (
    "import torch\n"
    "\n"
    "def main():\n"
    "    print('=' * 100)  # not a separator line in the source\n"
    "    return 0\n"
)


def make_log_text(
    val_losses=(3.5, 2.4, 1.95, 1.8712),
    every=50,
    total_steps=None,
    ms_per_step=40,
    source=FAKE_SOURCE,
    target=TARGET,
    val_tokens=111488,
    tokens_per_step=8192,
    final="reached",
    sha=None,
):
    """Well-formed log: val lines at steps 0, every, 2*every, ... (eval_interval = every), train lines every
    every//2 steps (log_interval). total_steps (max_iters) defaults to the last val step: a run of its whole
    budget; a larger total_steps makes a run that stopped at the target.

    final: "reached", "not_reached" or None (no final line, i.e. truncated run).
    """
    assert source.endswith("\n")
    last_step = (len(val_losses) - 1) * every
    total_steps = total_steps or last_step
    log_every = max(1, every // 2)
    sha = sha or hashlib.sha256(source.encode("utf-8")).hexdigest()
    lines = [
        SEP,
        f"code_sha256:{sha}",
        "python:3.11.7 torch:2.13.0+cpu cuda:none numpy:2.4.6",
        "cpu: Test CPU (2 logical cores, torch threads 2)",
        f"target_val_loss: {target}",
        f"val_tokens: {val_tokens}",
        f"tokens_per_step: {tokens_per_step}",
        f"max_iters: {total_steps}",
        f"eval_interval: {every}",
        f"log_interval: {log_every}",
    ]
    for i, vl in enumerate(val_losses):
        step = i * every
        if step > 0:
            for s in range(step - every + log_every, step + 1, log_every):
                t = s * ms_per_step
                lines.append(
                    f"step:{s}/{total_steps} train_loss:{vl + 0.05:.4f} train_time:{t}ms "
                    f"step_avg:{t / s:.2f}ms tok/s:{int(tokens_per_step / ms_per_step * 1000)} mfu:n/a"
                )
        t = step * ms_per_step
        avg = t / step if step else 0.0
        lines.append(
            f"step:{step}/{total_steps} val_loss:{vl:.4f} train_time:{t}ms step_avg:{avg:.2f}ms"
        )
    last_t = last_step * ms_per_step
    if final == "reached":
        lines.append(f"target val_loss {target:.4f} reached at step:{last_step} train_time:{last_t}ms")
    elif final == "not_reached":
        best = min(val_losses)
        best_step = val_losses.index(best) * every
        lines.append(f"target val_loss {target:.4f} not reached: best val_loss {best:.4f} at step:{best_step}")
    return source + "\n".join(lines) + "\n"


def write_log(directory, name="run", text=None, **kwargs):
    """Write a log file (synthetic unless `text` is given) and return its path."""
    path = Path(directory) / f"{name}.txt"
    path.write_text(text if text is not None else make_log_text(**kwargs), encoding="utf-8")
    return path


def run_script(script, *args):
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


def assert_refused(path, fragment):
    r = verify.verify_log(path)
    assert not r["ok"], r
    assert fragment in r["reason"], r["reason"]
    return r


# ---------------------------------------------------------------- verify_log

def test_wellformed_log_verifies(tmp_path):
    p = write_log(tmp_path)
    r = verify.verify_log(p)
    assert r["ok"], r["reason"]
    assert r["budget"] == "fixed" and r["max_iters"] == 150
    assert r["final_val_loss"] == pytest.approx(1.8712)
    assert r["train_time_ms"] == 150 * 40
    assert r["step"] == 150
    assert r["target"] == pytest.approx(TARGET)
    assert r["val_tokens"] == "111488"


def test_parse_log_structure():
    text = make_log_text()
    parsed = verify.parse_log(text)
    assert parsed["errors"] == []
    assert parsed["source"] == FAKE_SOURCE
    assert parsed["code_sha256"] == parsed["computed_sha256"]
    assert parsed["header"]["target_val_loss"] == "1.88"
    assert [v["step"] for v in parsed["val"]] == [0, 50, 100, 150]
    assert parsed["train"][0]["extra"]["mfu"] == "n/a"
    assert parsed["final"]["reached"] is True


def test_extra_fields_nan_checkpoint_and_resume_accepted(tmp_path):
    """A run killed after its step-50 checkpoint and resumed: the lines the killed process printed after the
    checkpoint (val 50, train 75) are printed again by the resumed one."""
    text = make_log_text()
    val50 = "step:50/150 val_loss:2.4000 train_time:2000ms step_avg:40.00ms"
    train75 = "step:75/150 train_loss:2.0000 train_time:3000ms step_avg:40.00ms tok/s:204800 mfu:n/a"
    assert val50 in text and train75 in text
    text = text.replace(val50, "checkpoint step:50 train_time:2000ms saved ckpt/run_50.pt\n"
                        f"{val50}\n{train75.replace('2.0000', '2.0100')}\n"  # lost when the run was killed
                        "resume from ckpt/run_50.pt at step:50 train_time:2000ms\n"
                        f"{val50} val_mtp2:2.31\noptimizer: muon state 1,024 bytes, 0.500 of AdamW's 2,048\n"
                        "data: pass 2 begins at step:60")
    text = text.replace("step:125/150 train_loss:2.0000", "step:125/150 train_loss:nan")
    p = write_log(tmp_path, text=text)
    r = verify.verify_log(p)
    assert r["ok"], r["reason"]
    assert r["n_resumes"] == 1 and r["data_passes"] == [(2, 60)]
    forged = text.replace("resume from ckpt/run_50.pt at step:50", "resume from ckpt/run_40.pt at step:50")
    assert_refused(write_log(tmp_path, "forged", text=forged), "never saved")
    # without the resumed process's val line for step 50, the finished run lacks it
    lines = text.split("\n")
    resumed_val = lines.index(f"{val50} val_mtp2:2.31")
    kept = lines[:resumed_val] + lines[resumed_val + 1:]
    next_step = next(i for i in range(resumed_val, len(kept)) if kept[i].startswith("step:"))
    r = assert_refused(write_log(tmp_path, "dropped", text="\n".join(kept)), "the val line for step:50 is missing")
    assert r["reason"].startswith(f"line {next_step + 1}:")  # the step line it should come before


def test_data_pass_lines_reported(tmp_path):
    text = make_log_text().replace("step:100/150 val_loss", "data: pass 2 begins at step:100\nstep:100/150 val_loss")
    r = run_script(VERIFY, write_log(tmp_path, text=text), "--no-stats")
    assert r.returncode == 0, r.stdout
    notes = [line for line in r.stdout.splitlines() if line.startswith("note ")]
    assert len(notes) == 1 and "data repeated (pass 2 at step:100)" in notes[0]


def test_tampered_val_line_refused(tmp_path):
    text = make_log_text()
    bad = text.replace("val_loss:1.8712", "val_loss:1.9712")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "not <= target")


def test_val_line_changed_to_claim_target_refused(tmp_path):
    text = make_log_text(val_losses=(3.5, 2.4, 1.95, 1.91), final="not_reached")
    bad = text.replace("val_loss:1.9100 train_time", "val_loss:1.8700 train_time")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "below the best val_loss 1.9100")


def test_val_below_target_before_the_end_refused(tmp_path):
    text = make_log_text(total_steps=2000)
    bad = text.replace("val_loss:1.9500", "val_loss:1.8500")
    assert_refused(write_log(tmp_path, text=bad), "so the run stops here")


def test_tampered_code_refused(tmp_path):
    text = make_log_text()
    bad = text.replace("return 0", "return 1", 1)
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "sha256 mismatch")


def test_missing_sha_line_refused(tmp_path):
    text = make_log_text()
    lines = text.split("\n")
    bad = "\n".join(l for l in lines if not l.startswith("code_sha256:"))
    assert_refused(write_log(tmp_path, text=bad), "code_sha256")


def test_decreasing_train_time_refused(tmp_path):
    text = make_log_text()
    bad = text.replace("step:100/150 val_loss:1.9500 train_time:4000ms",
                       "step:100/150 val_loss:1.9500 train_time:1000ms")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "decreases")


def test_truncated_run_refused(tmp_path):
    assert_refused(write_log(tmp_path, final=None), "no final")


def test_not_reached_before_max_iters_refused(tmp_path):
    r = assert_refused(write_log(tmp_path, val_losses=(3.5, 2.4, 1.95, 1.91), total_steps=2000,
                                 final="not_reached"), "before max_iters 2000")
    assert "not reached" in r["reason"]


def test_not_reached_full_budget_accepted(tmp_path):
    """A run of its whole budget that ends above the target is a valid run: the t-test judges the mean."""
    r = verify.verify_log(write_log(tmp_path, val_losses=(3.5, 2.4, 1.95, 1.91), final="not_reached"))
    assert r["ok"], r["reason"]
    assert r["budget"] == "fixed" and r["final_val_loss"] == pytest.approx(1.91)


def test_header_without_intervals_refused(tmp_path):
    text = make_log_text().replace("eval_interval: 50\n", "")
    assert_refused(write_log(tmp_path, text=text), "no 'eval_interval:' header line")


def test_unparseable_step_line_refused(tmp_path):
    text = make_log_text()
    bad = text.replace("step:50/150 val_loss:2.4000", "step:50/150 val_loss:2.4O00")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "unparseable step line")


def test_final_line_step_mismatch_refused(tmp_path):
    text = make_log_text(total_steps=2000)
    bad = text.replace("reached at step:150 train_time:6000ms", "reached at step:100 train_time:6000ms")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "last val line")


def test_off_grid_line_refused(tmp_path):
    text = make_log_text()
    extra = "step:30/150 train_loss:2.4000 train_time:1200ms step_avg:40.00ms tok/s:1 mfu:n/a"
    bad = text.replace("step:50/150 train_loss", f"{extra}\nstep:50/150 train_loss")
    assert_refused(write_log(tmp_path, text=bad), "train line for step:30 is off the grid")


def test_missing_file_refused(tmp_path):
    assert_refused(tmp_path / "nope.txt", "cannot read")
    r = run_script(VERIFY, tmp_path / "nope.txt")
    assert r.returncode == 2 and "nope.txt: no such file" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_script(VERIFY, tmp_path)
    assert r.returncode == 2 and f"{tmp_path}: is a folder" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("flags, message", [(["--tolerance", "nan"], "--tolerance nan: give a finite number >= 0"),
                                            (["--tolerance", "-1"], "--tolerance -1.0: give a finite number >= 0"),
                                            (["--target", "nan"], "--target nan: give a finite val loss >= 0")])
def test_verify_refuses_numbers_that_cannot_be_a_bound(tmp_path, flags, message):
    r = run_script(VERIFY, write_log(tmp_path), *flags)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


def test_target_override_is_the_t_test_target(tmp_path):
    paths = three_logs(tmp_path)
    results = [verify.verify_log(p, target=1.9) for p in paths]
    assert all(r["ok"] for r in results)
    finals = [r["final_val_loss"] for r in results]
    s = verify.summarize(results, target=1.9)
    assert s["target"] == 1.9
    assert s["p"] == pytest.approx(float(stats.ttest_1samp(finals, 1.9, alternative="less").pvalue))


# ---------------------------------------------------------------- stats / CLI

def three_logs(tmp_path, finals=(1.8712, 1.8695, 1.8702), total_steps=None):
    paths = []
    for i, v in enumerate(finals):
        paths.append(write_log(tmp_path, name=f"run{i}", val_losses=(3.5, 2.4, 1.95, v),
                               ms_per_step=40 + i, total_steps=total_steps))
    return paths


def test_pvalue_matches_scipy(tmp_path):
    finals = (1.8712, 1.8695, 1.8702)
    results = [verify.verify_log(p) for p in three_logs(tmp_path, finals)]
    assert all(r["ok"] and r["budget"] == "fixed" for r in results)
    s = verify.summarize(results)
    expected = stats.ttest_1samp(finals, TARGET, alternative="less").pvalue
    assert s["p"] == pytest.approx(float(expected), rel=1e-9)
    assert s["n"] == 3
    assert s["loss_mean"] == pytest.approx(sum(finals) / 3)


def test_cli_exit_zero_when_significant(tmp_path):
    paths = three_logs(tmp_path)
    r = run_script(VERIFY, *paths)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("OK ") == 3
    expected = stats.ttest_1samp((1.8712, 1.8695, 1.8702), TARGET, alternative="less").pvalue
    assert expected < 0.01
    assert f"{expected:.3g}" in r.stdout


def test_stop_at_target_runs_get_no_t_test(tmp_path):
    """The same final val losses from runs that stopped at the target: their time to target is reported, the
    t-test is refused with the reason, and --no-stats accepts the logs."""
    paths = three_logs(tmp_path, total_steps=2000)
    assert stats.ttest_1samp((1.8712, 1.8695, 1.8702), TARGET, alternative="less").pvalue < 0.01
    r = run_script(VERIFY, *paths)
    assert r.returncode == 1, r.stdout
    assert r.stdout.count("(stopped at the target)") == 3
    assert "time to target: mean 6.15s" in r.stdout
    refusal = [line for line in r.stdout.splitlines() if line.startswith("p-value")]
    assert len(refusal) == 1 and "n/a (3 of 3 runs stopped at the target" in refusal[0]
    assert run_script(VERIFY, *paths, "--no-stats").returncode == 0


def test_cli_exit_one_when_not_significant(tmp_path):
    paths = three_logs(tmp_path, finals=(1.8799, 1.8700, 1.8795))
    p = stats.ttest_1samp((1.8799, 1.8700, 1.8795), TARGET, alternative="less").pvalue
    assert p >= 0.01
    r = run_script(VERIFY, *paths)
    assert r.returncode == 1, r.stdout
    assert run_script(VERIFY, *paths, "--no-stats").returncode == 0


def test_cli_single_log_needs_no_stats(tmp_path):
    p = write_log(tmp_path)
    r = run_script(VERIFY, p)
    assert r.returncode == 1
    assert "n/a (n=1" in r.stdout
    assert run_script(VERIFY, p, "--no-stats").returncode == 0


def test_cli_zero_variance(tmp_path):
    paths = [write_log(tmp_path, name=f"run{i}", val_losses=(3.5, 2.4 + i / 100, 1.95, 1.87)) for i in range(3)]
    r = run_script(VERIFY, *paths)
    assert r.returncode == 1
    assert "zero variance" in r.stdout


def test_cli_copies_of_one_run_fail(tmp_path):
    """Logs with the same losses at the same steps are one run under several names, whatever their times: each
    copy after the first fails, naming it; a run with other losses verifies."""
    first, copy, edited = (write_log(tmp_path, name=name, ms_per_step=ms) for name, ms in
                           (("run1", 40), ("run1_again", 40), ("faster", 30)))
    other = write_log(tmp_path, name="run2", val_losses=(3.5, 2.4, 1.95, 1.8695))
    r = run_script(VERIFY, first, copy, other, edited, "--no-stats")
    assert r.returncode == 1, r.stdout
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == [f"FAIL {p}: the same losses as {first}: a copy of one run under another name; each run of a "
                     "record needs its own seed (the same seed on the same machine prints the same losses) "
                     f"[last val_loss 1.8712, time {t}]" for p, t in ((copy, "6.00s (0.10 min)"),
                                                                      (edited, "4.50s (0.07 min)"))], r.stdout
    assert r.stdout.count("OK ") == 2 and "verified 2/4 logs" in r.stdout


def test_cli_one_bad_log_fails(tmp_path):
    paths = three_logs(tmp_path)
    text = paths[1].read_text().replace("return 0", "return 2", 1)
    paths[1].write_text(text)
    r = run_script(VERIFY, *paths, "--no-stats")
    assert r.returncode == 1
    fail_lines = [l for l in r.stdout.splitlines() if l.startswith("FAIL")]
    assert len(fail_lines) == 1 and str(paths[1]) in fail_lines[0] and "sha256" in fail_lines[0]


def test_committed_records_verify_under_the_fixed_budget_rule(tmp_path):
    """The committed shakespeare_char records are complete, untampered logs. The 2026-11-22 runs stopped at the
    target, so the t-test is refused for them; the fixed-budget records pass it at p < 0.01."""
    folders = sorted(p for p in (RECORDS / "shakespeare_char").iterdir() if p.is_dir())
    stop = [f for f in folders if f.name.startswith("2026-11-22_")]
    fixed = [f for f in folders if f not in stop]
    assert len(stop) == 2 and len(fixed) >= 2
    for folder in stop:
        results = [verify.verify_log(p) for p in sorted(folder.glob("*.txt"))]
        assert len(results) == 3
        assert all(r["ok"] and r["budget"] == "stop" for r in results), [r["reason"] for r in results]
        s = verify.summarize(results)
        assert s["p"] is None and "stopped at the target" in s["p_reason"]
    for folder in fixed:
        results = [verify.verify_log(p, target=1.88) for p in sorted(folder.glob("*.txt"))]
        assert len(results) >= 5 and all(r["ok"] and r["budget"] != "stop" for r in results), folder
        assert verify.summarize(results, target=1.88)["p"] < 0.01, folder


# ---------------------------------------------------------------- plot

def test_plot_writes_png(tmp_path):
    paths = three_logs(tmp_path)
    out = tmp_path / "curves.png"
    r = run_script(PLOT, *paths, "-o", out)
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_missing_file_exit_2(tmp_path):
    r = run_script(PLOT, tmp_path / "missing.txt", "-o", tmp_path / "x.png")
    assert r.returncode == 2
    assert "missing.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("output, message", [
    ("folder", "is a folder: give a file name, e.g. "), ("curves.txt", "give a file ending in .png, .pdf, .svg"),
    ("noext", "give a file ending in .png"), ("afile/x.png", "afile is a file, not a folder")])
def test_plot_refuses_an_output_it_cannot_write_as_named(tmp_path, output, message):
    paths = three_logs(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_script(PLOT, *paths, "-o", tmp_path / output)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any((tmp_path / "folder").iterdir())


def test_plot_no_val_lines_exit_2(tmp_path):
    text = "\n".join(l for l in make_log_text().split("\n") if "val_loss:" not in l)
    p = write_log(tmp_path, text=text)
    r = run_script(PLOT, p, "-o", tmp_path / "x.png")
    assert r.returncode == 2
    assert "no val lines" in r.stderr and len(r.stderr.strip().splitlines()) == 1
