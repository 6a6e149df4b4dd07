"""Bad input, and runs that must not clobber each other: one clear line, the right exit code, no file left behind
that looks like a run's."""
import errno
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
from conftest import ROOT, TEXT, make_char_data, tiny_args


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
    (dict(logit_softcap=-15.0), "--logit_softcap must be >= 0 (0: no cap), got -15.0"),
    (dict(tied_head_steps=-1), "--tied_head_steps must be non-negative"),
    (dict(tie_embeddings=True, tied_head_steps=40), "--tied_head_steps 40 unties the head late, but --tie_embeddings"),
    (dict(n_layer=4, value_embed=True, value_tables=3), "--value_tables 3: give 1 to 2 (half of --n_layer 4"),
    (dict(n_layer=4, value_tables=2), "together with --value_embed True"),
    (dict(value_embed=True, value_tables=0), "--value_tables 0: give 1 to"),
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


def start_run_to_interrupt(args):
    """train_gpt.py in a child with SIGINT's default action, whatever the test runner inherited (a shell starts
    background jobs with SIGINT ignored, and a child would inherit that)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train_gpt.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_names_the_step_and_how_to_resume(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    args = tiny_args(char_data, logs, run_id="int", max_iters=100000, eval_interval=0, save_every=3)
    proc = start_run_to_interrupt(args)
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
    proc = start_run_to_interrupt(args)
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


@pytest.mark.parametrize("save_every, written", [(2, "checkpoint_000002.pt"), (0, "model.pt")])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, char_data, monkeypatch, capsys, save_every,
                                                            written):
    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")  # as a file's write() raises it: naming no file
    monkeypatch.setattr(train_gpt.torch, "save", full_disk)
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as exit_:
        train_gpt.run_cli(lambda: train_gpt.main(tiny_args(char_data, str(logs), run_id="full", save_every=save_every,
                                                           max_iters=4, warmdown_iters=1)))
    assert exit_.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: could not write {logs / 'full' / written}: No space left")
    assert not [p for p in logs.rglob("*") if ".tmp" in p.name or p.name == written]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_torch_save_onto_a_full_device_is_a_full_disk_error(tmp_path):
    """Given a path, torch.save reports a full disk as a RuntimeError without an errno; atomic_save's file object
    gets the OSError that run_cli reports in one line, naming the file."""
    path = tmp_path / "model.pt"
    os.symlink("/dev/full", f"{path}.tmp{os.getpid()}")  # the temporary file atomic_save writes first
    with pytest.raises(OSError) as err:
        train_gpt.atomic_save({"weights": torch.zeros(10_000)}, str(path))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert os.listdir(tmp_path) == []


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


RANK_WRAPPER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train_gpt
if os.environ["RANK"] == "1":  # rank 1 alone gets other flags, or dies in one of the trainer's methods
    sys.argv += {flags!r}
    if {dies_in!r}:
        setattr(train_gpt.Trainer, {dies_in!r}, lambda *args: os.kill(os.getpid(), signal.SIGKILL))
train_gpt.run_cli(train_gpt.main)
"""


def torchrun_where_rank_1_differs(tmp_path, char_data, flags=(), dies_in="", extra=()):
    """A 2-process torchrun job of a tiny run in which rank 1 is given more flags, or is killed in dies_in."""
    script = tmp_path / "rank_wrapper.py"
    script.write_text(RANK_WRAPPER.format(root=ROOT, flags=list(flags), dies_in=dies_in))
    args = tiny_args(char_data, str(tmp_path / "logs"), run_id="job") + list(extra)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("extra", [[], ["--check"]])
def test_ranks_given_other_settings_stop_in_one_line_naming_them(tmp_path, char_data, extra):
    result = torchrun_where_rank_1_differs(tmp_path, char_data, flags=["--max_iters=10"], extra=extra)
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and ours == [
        "error: rank 1 differs from rank 0: rank 1's max_iters is 10, rank 0's 20 (and 1 more: lr_decay_iters); "
        "launch every rank with the same command and the same data"], result.stderr
    assert not (tmp_path / "logs").exists()


def test_a_rank_with_other_or_missing_data_is_named(tmp_path, char_data):
    other = tmp_path / "other"
    make_char_data(str(other), text=TEXT[::-1])
    result = torchrun_where_rank_1_differs(tmp_path, char_data, flags=[f"--input_bin={other}/train_*.bin",
                                                                       f"--input_val_bin={other}/val_*.bin"])
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 1 differs from rank 0: rank 1's input_bin shards is "
                                                 "[0] ('train_000000.bin', "), ours  # the same size, other text
    result = torchrun_where_rank_1_differs(tmp_path, char_data, flags=[f"--input_bin={tmp_path}/gone/train_*.bin"])
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith(f"error: rank 1: no training shards match {tmp_path}/gone/"), ours
    assert 'train_gpt.py", line' not in result.stderr, result.stderr  # torchrun's summary is the only traceback


def test_a_rank_lost_during_start_up_is_named_and_leaves_no_log(tmp_path, char_data):
    result = torchrun_where_rank_1_differs(tmp_path, char_data, dies_in="setup")
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: rank 1 was lost during start-up, before step:0 (the process ended; torchrun's summary "
                    "says how); no checkpoint was written (they need --save_every N), so start again"], result.stderr
    assert "Connection closed" not in result.stderr and "[rank" not in result.stderr, result.stderr
    assert not (tmp_path / "logs" / "job.txt").exists()  # the header alone is removed: the run_id is free again


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


# --- inputs a hostile user tries: each used to end in a traceback or be accepted

def test_a_train_glob_that_matches_a_val_shard_is_refused(tmp_path, char_data):
    for overrides in (dict(input_bin=os.path.join(char_data, "*.bin")),
                      dict(input_val_bin=os.path.join(char_data, "train_*.bin"))):
        for check in ([], ["--check"]):
            result = cli(tiny_args(char_data, str(tmp_path / "logs"), **overrides) + check)
            assert_one_line(result, 2, "is matched by both --input_bin ")
            assert "give globs that select separate train and val shards" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_a_run_id_too_long_for_a_file_name_is_refused(tmp_path, char_data):
    result = cli(tiny_args(char_data, str(tmp_path / "logs"), run_id="a" * 300))
    assert_one_line(result, 2, f"--run_id is 300 characters long; give at most {train_gpt.MAX_RUN_ID_CHARS}")


@pytest.mark.parametrize("flags", [["--n_layer", str(10 ** 20)], ["--n_embd", str(10 ** 12)],
                                   ["--n_head", str(10 ** 14), "--n_embd", str(10 ** 14), "--pos_emb", "learned"]])
def test_check_refuses_an_absurd_shape_at_once(tmp_path, char_data, flags):
    result = cli(tiny_args(char_data, str(tmp_path / "logs")) + ["--check", *flags])
    assert_one_line(result, 2, "parameters, more than the ")


def test_a_closed_stdout_ends_check_quietly_and_a_run_goes_on(tmp_path, char_data):
    """`--check | head -1` exits 1 with nothing on stderr; a run whose console closes finishes its log."""
    for extra, code in ((["--check"], 1), (["--run_id", "piped"], 0)):
        args = " ".join(f"'{a}'" for a in tiny_args(char_data, str(tmp_path / "logs"), max_iters=6) + extra)
        result = subprocess.run(["bash", "-c", f"'{sys.executable}' train_gpt.py {args} | head -1; "
                                 "exit ${PIPESTATUS[0]}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == code and len(result.stdout.splitlines()) == 1, result.stderr
        assert result.stderr == "", result.stderr
    assert (tmp_path / "logs" / "piped.txt").read_text().splitlines()[-1].startswith("target val_loss")


def test_a_header_only_log_names_how_to_reuse_its_run_id(tmp_path, char_data):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "stopped.txt").write_text(train_gpt.own_source() + train_gpt.LOG_SEPARATOR + "\ncode_sha256:x\nlog: x\n")
    result = cli(tiny_args(char_data, str(logs), run_id="stopped"))
    assert_one_line(result, 2, "stopped.txt holds no step (its run stopped during start-up, or is still starting)")
    assert "remove that log to use the run_id again" in result.stderr


@pytest.mark.parametrize("damage_kind", ["bytes", "truncated", "key"])
def test_sampling_a_damaged_model_is_one_line(finished_run, tmp_path, damage_kind):
    _, logs, run_id = finished_run
    data = open(os.path.join(logs, run_id, "model.pt"), "rb").read()
    path = tmp_path / "model.pt"
    if damage_kind == "key":
        payload = torch.load(os.path.join(logs, run_id, "model.pt"), weights_only=True)
        del payload["hyperparameters"]
        torch.save(payload, path)
    else:
        half = len(data) // 2
        path.write_bytes(data[:half] + (b"\0" * 512 + data[half + 512:] if damage_kind == "bytes" else b""))
    result = cli(["--sample", str(path), "--prompt", "a", "--max_new_tokens", "4"])
    assert_one_line(result, 2, f"--sample {path}: not a whole model saved by train_gpt.py (")
