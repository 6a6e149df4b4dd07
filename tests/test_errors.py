"""Bad input, and runs that must not clobber each other: one clear line, the right exit code, no file left behind
that looks like a run's."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt
from conftest import ROOT, make_char_data, tiny_args


def cli(args, script="train_gpt.py", **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kwargs)


def assert_one_line(result, code, message):
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run that saved checkpoints and finished: (data dir, log dir, run_id)."""
    root = tmp_path_factory.mktemp("finished")
    data, logs = str(root / "data"), str(root / "logs")
    make_char_data(data)
    train_gpt.main(tiny_args(data, logs, run_id="done", max_iters=4, eval_interval=2, save_every=2,
                             warmdown_iters=2))
    return data, logs, "done"


# --- flags and data that used to end in a traceback

@pytest.mark.parametrize("overrides, message", [
    (dict(val_tokens=8), "--val_tokens 8 is less than one window of --block_size 16"),
    (dict(beta1=1.0), "--beta1 1.0 and --beta2 0.95 must be in [0, 1)"),
    (dict(beta2=-0.1), "must be in [0, 1)"),
    (dict(weight_decay=-1), "--weight_decay must be >= 0"),
    (dict(target_val_loss=-1), "--target_val_loss must be >= 0 (0: no target)"),
    (dict(learning_rate="nan"), "--learning_rate nan: give a finite number"),
    (dict(recipe="speedrun", muon_lr="nan"), "--muon_lr nan: give a finite number"),
    (dict(weight_decay="nan"), "--weight_decay nan: give a finite number"),
    (dict(learning_rate="inf"), "--learning_rate inf: give a finite number"),
    (dict(target_val_loss="nan"), "--target_val_loss nan: give a finite number"),
    (dict(grad_clip=-1), "--grad_clip and --max_data_passes must be >= 0"),
    (dict(max_data_passes=-1), "--grad_clip and --max_data_passes must be >= 0"),
    (dict(seed=-1), "--seed -1: give a seed from 0 to 4294967295"),
    (dict(ngram_embed=1), "--ngram_embed 1: give 2 to 4 (tables for the n-grams 2..N), or 0 for none"),
    (dict(ngram_embed=5), "--ngram_embed 5: give 2 to 4"),
    (dict(muon_momentum_warmup=-1), "--muon_momentum_warmup must be non-negative"),
    (dict(seed=2 ** 70), "--seed 1180591620717411303424: give a seed from 0 to 4294967295"),
])
def test_impossible_values_are_refused(tmp_path, char_data, overrides, message):
    with pytest.raises(train_gpt.UsageError) as err:
        train_gpt.main(tiny_args(char_data, str(tmp_path / "logs"), **overrides))
    assert message in str(err.value)
    assert not (tmp_path / "logs").exists()


def test_input_bin_naming_a_folder(tmp_path, char_data):
    with pytest.raises(train_gpt.UsageError, match="names the folder .* give a glob such as .*train_\\*.bin"):
        train_gpt.main(tiny_args(char_data, str(tmp_path / "logs"), input_bin=char_data))


def test_shard_with_a_negative_token_count(tmp_path, char_data):
    path = os.path.join(char_data, "train_000000.bin")
    header = np.fromfile(path, dtype=np.int32, count=train_gpt.HEADER_INTS)
    header[2] = -5
    with open(path, "r+b") as f:
        f.write(header.tobytes())
    with pytest.raises(train_gpt.UsageError, match="token count is negative \\(-5\\)"):
        train_gpt.main(tiny_args(char_data, str(tmp_path / "logs")))


def test_log_dir_that_is_a_file(tmp_path, char_data):
    (tmp_path / "afile").write_text("x")
    result = cli(tiny_args(char_data, str(tmp_path / "afile")))
    assert_one_line(result, 2, "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_shakespeare_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = cli(["--out_dir", str(tmp_path / "afile")], script="data/shakespeare.py")
    assert_one_line(result, 2, "--out_dir")
    assert "is a file" in result.stderr and (tmp_path / "afile").read_text() == "x"


# --- sampling

def test_sampling_refuses_a_checkpoint_and_negative_options(finished_run):
    _, logs, run_id = finished_run
    checkpoint = glob.glob(os.path.join(logs, run_id, "checkpoint_*.pt"))[0]
    with pytest.raises(train_gpt.UsageError, match="a training checkpoint, not a model"):
        train_gpt.main(["--sample", checkpoint])
    model = os.path.join(logs, run_id, "model.pt")
    for flag in ("--top_k", "--temperature"):
        with pytest.raises(train_gpt.UsageError, match="must be >= 0"):
            train_gpt.main(["--sample", model, flag, "-1"])


def test_sampling_names_the_prompt_characters_it_drops(finished_run, capsys):
    _, logs, run_id = finished_run
    model = os.path.join(logs, run_id, "model.pt")
    train_gpt.main(["--sample", model, "--prompt", "the QZ", "--max_new_tokens", "5"])
    captured = capsys.readouterr()
    assert "'QZ'" in captured.err and "dropped" in captured.err
    assert captured.out.startswith("the ")
    with pytest.raises(train_gpt.UsageError, match="none of its characters is in the model's vocabulary"):
        train_gpt.main(["--sample", model, "--prompt", "QZ"])


# --- no run loses another's data

def test_a_new_run_refuses_an_existing_run_id(finished_run):
    data, logs, run_id = finished_run
    log = os.path.join(logs, f"{run_id}.txt")
    before = open(log).read()
    with pytest.raises(train_gpt.UsageError, match=f"--run_id {run_id}: .* belongs to another run"):
        train_gpt.main(tiny_args(data, logs, run_id=run_id, max_iters=6))
    assert open(log).read() == before


def test_the_log_is_created_exclusively(tmp_path):
    path = str(tmp_path / "run.txt")
    train_gpt.RunLog(path)
    with pytest.raises(train_gpt.UsageError, match="created by another run"):
        train_gpt.RunLog(path)


def test_resuming_a_finished_run_is_refused(finished_run):
    data, logs, run_id = finished_run
    before = open(os.path.join(logs, f"{run_id}.txt")).read()
    with pytest.raises(train_gpt.UsageError, match="that run is finished"):
        train_gpt.main(["--resume", "auto", "--run_id", run_id, "--log_dir", logs])
    assert open(os.path.join(logs, f"{run_id}.txt")).read() == before


def test_ctrl_c_names_the_step_and_how_to_resume(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    args = tiny_args(char_data, logs, run_id="int", max_iters=100000, eval_interval=0, save_every=3)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_gpt.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not glob.glob(os.path.join(logs, "int", "checkpoint_*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step:") and "the last checkpoint is " in last, err
    assert last.endswith(": resume with the same command and --resume auto --run_id int"), err
    assert "Traceback" not in err
    assert glob.glob(os.path.join(logs, "int", "checkpoint_*.pt"))


def test_ctrl_c_without_checkpoints_says_there_is_nothing_to_resume(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    args = tiny_args(char_data, logs, run_id="int", max_iters=100000, eval_interval=0, log_interval=1)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_gpt.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log, deadline = os.path.join(logs, "int.txt"), time.time() + 120
    while not (os.path.exists(log) and "step:2/" in open(log).read()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].endswith(
        "no checkpoint was written (they need --save_every N), so start again"), err


# --- nothing escapes its folder, nothing changes a run silently

@pytest.mark.parametrize("run_id", ["../escape", "base1/intruder", ".hidden", "-x", "a b"])
def test_a_run_id_is_a_name_never_a_path(tmp_path, char_data, run_id):
    logs = tmp_path / "logs"
    result = cli(tiny_args(char_data, str(logs), run_id=run_id, max_iters=2, warmdown_iters=1))
    assert_one_line(result, 2, "is not a plain name: use letters, digits")
    assert not logs.exists() and not (tmp_path / "escape.txt").exists() and not (tmp_path / "escape").exists()


def test_a_log_dir_that_cannot_be_written_is_refused(tmp_path, char_data, monkeypatch):
    monkeypatch.setattr(train_gpt.os, "access", lambda path, mode: False)  # as for a user without the right
    with pytest.raises(train_gpt.UsageError, match=r"--log_dir .*: .* cannot be written; give a folder you can"):
        train_gpt.resolve_config(tiny_args(char_data, str(tmp_path / "logs")))


def test_a_shard_longer_than_its_header_says_is_refused(tmp_path, char_data):
    with open(os.path.join(char_data, "train_000000.bin"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(train_gpt.UsageError, match=r"header claims 8856 tokens but the file holds 8856.5; the "
                                                   r"shard is longer than its header says"):
        train_gpt.main(tiny_args(char_data, str(tmp_path / "logs")))


@pytest.mark.parametrize("flag, value", [("muon_lr", "0.001"), ("max_iters", "40"), ("mtp_steps", "2")])
def test_a_resume_that_would_change_the_run_is_refused(finished_run, tmp_path, flag, value):
    data, logs, run_id = finished_run
    payload = train_gpt.read_checkpoint(glob.glob(os.path.join(logs, run_id, "checkpoint_*.pt"))[0])
    payload["finished"] = False  # a copy, as if the run had been interrupted
    ckpt = str(tmp_path / "checkpoint.pt")
    train_gpt.atomic_save(payload, ckpt)
    with pytest.raises(train_gpt.UsageError, match=f"--resume continues a run as it was set up, but --{flag} "
                                                   f"{value} differs from the checkpoint's"):
        train_gpt.resolve_config(["--resume", ckpt, "--log_dir", logs, f"--{flag}", value])
    cfg = train_gpt.resolve_config(["--resume", ckpt, "--log_dir", logs, "--save_every", "5"])  # reporting may change
    assert cfg.save_every == 5 and cfg.resume == ckpt


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, char_data, monkeypatch, capsys):
    def full_disk(obj, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(train_gpt.torch, "save", full_disk)
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as exit_:
        train_gpt.run_cli(lambda: train_gpt.main(tiny_args(char_data, str(logs), run_id="full", save_every=2,
                                                           max_iters=4, warmdown_iters=1)))
    assert exit_.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not write ") and "No space left on device" in err[0]
    assert not [p for p in logs.rglob("*") if ".tmp" in p.name]


def rank_pid(run_id, rank):
    """The pid of the torchrun worker of this run with this rank (read from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if f"--run_id={run_id}".encode() in cmdline and f"RANK={rank}".encode() in environ and \
                b"torch.distributed.run" not in cmdline:  # a worker, not torchrun itself
            return int(pid)
    return None


def torchrun_until_checkpoint(char_data, tmp_path, run_id):
    """A 2-process torchrun run that would go on for long, once its first checkpoint exists."""
    logs = str(tmp_path / "logs")
    args = tiny_args(char_data, logs, run_id=run_id, max_iters=100000, eval_interval=0, save_every=5)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train_gpt.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 180
    while not glob.glob(os.path.join(logs, run_id, "checkpoint_*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    return proc


def error_lines_when_it_ends(proc):
    """The job's stderr and its `error:` lines, once it has ended with a non-zero exit code."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    return err, [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker's pid in /proc")
@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_rank_is_named_in_one_line_with_the_checkpoint_to_resume(tmp_path, char_data, killed):
    proc = torchrun_until_checkpoint(char_data, tmp_path, "lost")
    pid = rank_pid("lost", killed)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    err, ours = error_lines_when_it_ends(proc)
    assert len(ours) == 1 and ours[0].startswith(f"error: rank {killed} was lost at step:"), err
    checkpoint = ours[0].split("the last checkpoint is ")[1].split(": resume")[0]
    assert os.path.exists(checkpoint) and ours[0].endswith("resume with the same command and --resume auto "
                                                           "--run_id lost"), err
    assert "Connection closed" not in err and "[rank" not in err, err  # no survivor's traceback


def test_a_sigterm_to_torchrun_stops_the_job_with_how_to_resume(tmp_path, char_data):
    proc = torchrun_until_checkpoint(char_data, tmp_path, "term")
    proc.send_signal(signal.SIGTERM)  # what a scheduler does when it preempts the job; torchrun passes it on
    err, ours = error_lines_when_it_ends(proc)
    assert len(ours) == 1 and ours[0].startswith("error: stopped by a SIGTERM at step:"), err
    assert ours[0].endswith("resume with the same command and --resume auto --run_id term"), err
    assert "[rank" not in err, err


def damage(checkpoint, out, **fields):
    """The checkpoint with fields replaced, as if its run had stopped at step 2."""
    payload = torch.load(checkpoint, weights_only=True)
    payload.update(dict(step=2, finished=False), **fields)
    torch.save(payload, out)
    return str(out)


@pytest.mark.parametrize("field, value, message", [
    ("step", 50, "step 50 is not in [0, --max_iters 4]"),
    ("step", -3, "step -3 is not in [0, --max_iters 4]"),
    ("loader", None, "loader None is no position in the 1 training shard(s)"),
    ("loader", {"shard": 7, "position": 0, "epoch": 0}, "is no position in the 1 training shard(s)"),
    ("rng", "bytes", "rng state"),
    ("model", "cut", "the model's tensors are not this model's names and shapes"),
    ("optimizers", "cut", "the checkpoint is damaged (")])
def test_a_damaged_checkpoint_is_refused_in_one_line_and_writes_nothing(finished_run, tmp_path, field, value,
                                                                       message):
    data, logs, run_id = finished_run
    checkpoint = sorted(glob.glob(os.path.join(logs, run_id, "checkpoint_*.pt")))[0]
    payload = torch.load(checkpoint, weights_only=True)
    if value == "bytes":
        value = torch.zeros(3, dtype=torch.uint8)
    elif field == "model":
        value = dict(payload["model"], **{"lm_head.weight": payload["model"]["lm_head.weight"][:3]})
    elif field == "optimizers":
        value = [{"state": {}, "param_groups": []}]
    path = damage(checkpoint, tmp_path / "damaged.pt", **{field: value})
    new_logs = str(tmp_path / "logs")
    result = cli(tiny_args(data, new_logs, run_id="again", max_iters=4, eval_interval=2, warmdown_iters=2) +
                 ["--resume", path])
    assert_one_line(result, 2, message)
    assert "resume from an earlier one or start anew" in result.stderr
    assert not os.path.exists(os.path.join(new_logs, "again.txt"))


def test_a_dangling_shard_link_is_named(tmp_path, char_data):
    os.symlink(tmp_path / "gone.bin", os.path.join(char_data, "train_000001.bin"))
    result = cli(tiny_args(char_data, str(tmp_path / "logs")))
    assert_one_line(result, 2, "train_000001.bin is a link to ")
    assert "which does not exist: restore the shard or remove the link" in result.stderr


def test_sampling_refuses_a_temperature_that_is_not_finite(finished_run):
    _, logs, run_id = finished_run
    for temperature in ("nan", "inf"):
        result = cli(["--sample", os.path.join(logs, run_id, "model.pt"), "--temperature", temperature])
        assert_one_line(result, 2, "--temperature (finite)")
