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
    total_steps=2000,
    ms_per_step=40,
    source=FAKE_SOURCE,
    target=TARGET,
    val_tokens=111488,
    tokens_per_step=8192,
    final="reached",
    sha=None,
):
    """Well-formed log: val at steps 0, every, 2*every, ...; train lines between.

    final: "reached", "not_reached" or None (no final line, i.e. truncated run).
    """
    assert source.endswith("\n")
    sha = sha or hashlib.sha256(source.encode("utf-8")).hexdigest()
    lines = [
        SEP,
        f"code_sha256:{sha}",
        "python: 3.11.7",
        "torch: 2.13.0+cpu",
        "hardware: cpu x2",
        f"target_val_loss: {target}",
        f"val_tokens: {val_tokens}",
        f"tokens_per_step: {tokens_per_step}",
        f"num_iterations: {total_steps}",
    ]
    for i, vl in enumerate(val_losses):
        step = i * every
        if step > 0:
            for s in range(step - every + 1, step + 1, max(1, every // 2)):
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
    last_step = (len(val_losses) - 1) * every
    last_t = last_step * ms_per_step
    if final == "reached":
        lines.append(f"target val_loss {target:.4f} reached at step:{last_step} train_time:{last_t}ms")
    elif final == "not_reached":
        best = min(val_losses)
        lines.append(f"target val_loss {target:.4f} not reached: best val_loss {best:.4f} at step:{last_step}")
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


def test_extra_fields_nan_and_resume_accepted(tmp_path):
    text = make_log_text()
    text = text.replace(
        "step:50/2000 val_loss:2.4000 train_time:2000ms step_avg:40.00ms",
        "step:50/2000 val_loss:2.4000 train_time:2000ms step_avg:40.00ms val_mtp2:2.31\n"
        "checkpoint step:50 train_time:2000ms saved ckpt/run_50.pt\n"
        "step:60/2000 train_loss:2.1000 train_time:2400ms step_avg:40.00ms\n"  # lost when the run was killed
        "resume from ckpt/run_50.pt at step:50 train_time:2000ms",
    )
    text = text.replace("step:51/2000 train_loss:2.0000", "step:51/2000 train_loss:nan")
    p = write_log(tmp_path, text=text)
    r = verify.verify_log(p)
    assert r["ok"], r["reason"]
    assert r["n_resumes"] == 1
    forged = text.replace("resume from ckpt/run_50.pt at step:50", "resume from ckpt/run_40.pt at step:50")
    assert_refused(write_log(tmp_path, "forged.txt", text=forged), "never saved")


def test_tampered_val_line_refused(tmp_path):
    text = make_log_text()
    bad = text.replace("val_loss:1.8712", "val_loss:1.9712")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "not <= target")


def test_val_line_changed_to_claim_target_refused(tmp_path):
    text = make_log_text(val_losses=(3.5, 2.4, 1.95, 1.91), final="not_reached")
    bad = text.replace("val_loss:1.9100 train_time", "val_loss:1.8700 train_time")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "not reached")


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
    bad = text.replace("step:100/2000 val_loss:1.9500 train_time:4000ms",
                       "step:100/2000 val_loss:1.9500 train_time:1000ms")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "decreases")


def test_truncated_run_refused(tmp_path):
    assert_refused(write_log(tmp_path, final=None), "no final")


def test_not_reached_refused(tmp_path):
    assert_refused(write_log(tmp_path, val_losses=(3.5, 2.4, 1.95, 1.91), final="not_reached"),
                   "not reached")


def test_unparseable_step_line_refused(tmp_path):
    text = make_log_text()
    bad = text.replace("step:50/2000 val_loss:2.4000", "step:50/2000 val_loss:2.4O00")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "unparseable step line")


def test_final_line_step_mismatch_refused(tmp_path):
    text = make_log_text()
    bad = text.replace("reached at step:150 train_time:6000ms", "reached at step:100 train_time:6000ms")
    assert bad != text
    assert_refused(write_log(tmp_path, text=bad), "last val line")


def test_missing_file_refused(tmp_path):
    assert_refused(tmp_path / "nope.txt", "cannot read")


def test_target_override(tmp_path):
    p = write_log(tmp_path)
    assert verify.verify_log(p, target=1.9)["ok"]
    r = verify.verify_log(p, target=1.87)
    assert not r["ok"] and "not <= target" in r["reason"]


# ---------------------------------------------------------------- stats / CLI

def three_logs(tmp_path, finals=(1.8712, 1.8695, 1.8702)):
    paths = []
    for i, v in enumerate(finals):
        paths.append(write_log(tmp_path, name=f"run{i}", val_losses=(3.5, 2.4, 1.95, v),
                               ms_per_step=40 + i))
    return paths


def test_pvalue_matches_scipy(tmp_path):
    finals = (1.8712, 1.8695, 1.8702)
    results = [verify.verify_log(p) for p in three_logs(tmp_path, finals)]
    assert all(r["ok"] for r in results)
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
    paths = three_logs(tmp_path, finals=(1.87, 1.87, 1.87))
    r = run_script(VERIFY, *paths)
    assert r.returncode == 1
    assert "zero variance" in r.stdout


def test_cli_one_bad_log_fails(tmp_path):
    paths = three_logs(tmp_path)
    text = paths[1].read_text().replace("return 0", "return 2", 1)
    paths[1].write_text(text)
    r = run_script(VERIFY, *paths, "--no-stats")
    assert r.returncode == 1
    fail_lines = [l for l in r.stdout.splitlines() if l.startswith("FAIL")]
    assert len(fail_lines) == 1 and str(paths[1]) in fail_lines[0] and "sha256" in fail_lines[0]


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


def test_plot_no_val_lines_exit_2(tmp_path):
    text = "\n".join(l for l in make_log_text().split("\n") if "val_loss:" not in l)
    p = write_log(tmp_path, text=text)
    r = run_script(PLOT, p, "-o", tmp_path / "x.png")
    assert r.returncode == 2
    assert "no val lines" in r.stderr and len(r.stderr.strip().splitlines()) == 1
