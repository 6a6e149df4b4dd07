"""Checkpoints and exact resume, a rank that dies, non-finite steps, and Weights & Biases offline."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_gpt
from conftest import ROOT, run_log_text, tiny_args

VERIFY = os.path.join(ROOT, "records", "verify.py")


def final_state(log_dir, run_id):
    return torch.load(os.path.join(log_dir, run_id, "model.pt"), weights_only=True)["model"]


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def launch(args, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    prefix = [sys.executable, os.path.join(ROOT, "train_gpt.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         os.path.join(ROOT, "train_gpt.py")]
    return subprocess.Popen(prefix + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT, start_new_session=True)


def wait_for_checkpoint(proc, pattern, min_step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p[-9:-3]) for p in glob.glob(pattern)]
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stdout.read()[-2000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def rank_pids(torchrun_pid):
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    with open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children") as f:
        for pid in f.read().split():
            with open(f"/proc/{pid}/environ", "rb") as env:
                variables = dict(v.split(b"=", 1) for v in env.read().split(b"\0") if b"=" in v)
            if b"RANK" in variables:
                out[int(variables[b"RANK"])] = int(pid)
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_run_resumes_to_the_same_weights(tmp_path, char_data, nproc):
    """SIGKILL part-way (one process, or one of two torchrun ranks), resume, and compare bitwise with a run that
    was never interrupted. CPU kernels are deterministic for a fixed thread count, so bitwise equality holds."""
    logs = str(tmp_path / "logs")
    # the head unties at step 30, before the kill: the checkpoint must say which table the embedding is
    common = dict(max_iters=200, eval_interval=50, log_interval=50, save_every=20, grad_accum_steps=2,
                  dropout=0.1, timing_warmup_steps=1, tied_head_steps=30)
    reference = launch(tiny_args(char_data, logs, run_id="straight", **common), nproc)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()[-3000:]

    proc = launch(tiny_args(char_data, logs, run_id="killed", **common), nproc)
    wait_for_checkpoint(proc, os.path.join(logs, "killed", "checkpoint_*.pt"), 40)
    started = time.time()
    if nproc == 1:
        os.kill(proc.pid, signal.SIGKILL)
    else:  # one rank dies: the other must not hang
        workers = rank_pids(proc.pid)
        os.kill(workers[1], signal.SIGKILL)
    code = proc.wait(timeout=60)
    output = proc.stdout.read()
    assert code != 0 and time.time() - started < 60
    if nproc == 2:
        assert "rank" in output and "1" in output and "Signal 9" in output, output[-2000:]
    ckpts = glob.glob(os.path.join(logs, "killed", "checkpoint_*.pt"))
    assert len(ckpts) == 1  # the latest, intact: older ones are removed only after a new one is complete
    train_gpt.read_checkpoint(ckpts[0])

    resumed = launch(["--resume", "auto", "--run_id", "killed", "--log_dir", logs], nproc)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-3000:]
    assert_bitwise_equal(final_state(logs, "straight"), final_state(logs, "killed"))
    with open(os.path.join(logs, "killed.txt")) as f:
        text = f.read()
    with open(os.path.join(logs, "straight.txt")) as f:
        straight = f.read()
    assert text.count("\nresume from ") == 1 and text.count("=" * 100) == 1
    last_val = [line.split(" train_time")[0] for line in text.splitlines() if "val_loss:" in line][-1]
    assert last_val in straight  # the same final val loss, to the printed digits
    check = subprocess.run([sys.executable, VERIFY, "--no-stats", "--target", "9",
                            os.path.join(logs, "killed.txt")], capture_output=True, text=True)
    assert "train_time" not in check.stdout.split("FAIL")[-1] or check.returncode == 0, check.stdout


def test_checkpoint_of_another_model_is_refused(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    train_gpt.main(tiny_args(char_data, logs, run_id="a", max_iters=4, save_every=2, warmdown_iters=2))
    ckpt = glob.glob(os.path.join(logs, "a", "checkpoint_*.pt"))[0]
    payload = train_gpt.read_checkpoint(ckpt)
    payload["finished"] = False  # as if the run had been interrupted (a finished run is refused before this)
    train_gpt.atomic_save(payload, ckpt)
    with pytest.raises(train_gpt.UsageError, match=r"--n_embd 48 differs from the checkpoint's 32"):
        train_gpt.main(["--resume", ckpt, "--n_embd", "48", "--run_id", "b", "--log_dir", logs])
    payload["model_config"]["n_embd"] = 40  # weights of another model under this run's configuration
    train_gpt.atomic_save(payload, ckpt)
    with pytest.raises(train_gpt.UsageError, match=r"different model: n_embd \(32 here, 40 in the checkpoint\)"):
        train_gpt.main(["--resume", ckpt, "--run_id", "b", "--log_dir", logs])
    # refused before any file of the new run id is written
    assert not os.path.exists(os.path.join(logs, "b.txt")) and not os.path.exists(os.path.join(logs, "b"))
    open(ckpt + ".bad", "wb").write(b"not a checkpoint")
    with pytest.raises(train_gpt.UsageError, match="unreadable checkpoint"):
        train_gpt.main(["--resume", ckpt + ".bad"])


class Poisoned(torch.nn.Module):
    """Wraps the model so that its loss is NaN (as after an overflow or a bad batch)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        loss, main, aux = self.model(x, y)
        return loss * float("nan"), main * float("nan"), aux


def test_nan_step_applies_no_update_and_too_many_stop_with_a_checkpoint(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    cfg = train_gpt.resolve_config(tiny_args(char_data, logs, run_id="nan", max_bad_steps=3, max_iters=50,
                                              timing_warmup_steps=0, optimizer="adamw"))
    trainer = train_gpt.Trainer(cfg)
    trainer.setup()
    for step in range(2):
        _, grad_norm, bad = trainer.train_step(step)
        assert torch.isfinite(grad_norm) and not bad
    weights = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.optimizers[0].state[trainer.params[0]].items()}
    healthy = trainer.model
    trainer.model = Poisoned(healthy)
    loss, grad_norm, bad = trainer.train_step(2)
    assert bad and not torch.isfinite(grad_norm) and not torch.isfinite(loss)
    assert_bitwise_equal(weights, trainer.raw_model.state_dict())
    assert_bitwise_equal(moments, trainer.optimizers[0].state[trainer.params[0]])
    trainer.model = healthy
    _, grad_norm, bad = trainer.train_step(3)  # a good step after a bad one applies again
    assert torch.isfinite(grad_norm) and not bad
    lines = []
    trainer.log = lines.append
    trainer.model = Poisoned(healthy)
    with pytest.raises(train_gpt.TrainingError, match="3 non-finite steps in a row"):
        trainer.run()
    assert sum("skipped step" in line for line in lines) == 3
    saved = train_gpt.read_checkpoint(glob.glob(os.path.join(logs, "nan", "checkpoint_*.pt"))[0])
    assert_bitwise_equal(saved["model"], trainer.raw_model.state_dict())
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_wandb_offline_logs_metrics(tmp_path, char_data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logs = str(tmp_path / "logs")
    train_gpt.main(tiny_args(char_data, logs, run_id="wb", wandb=True, max_iters=6, eval_interval=3))
    # The offline run's transaction log holds every logged row as protobuf records whose values are JSON text.
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-wb.wandb"))
    assert len(runs) == 1
    deadline = time.time() + 60  # wandb's writer process may still be flushing on a busy machine
    while True:
        with open(runs[0], "rb") as f:
            data = f.read()
        if b"train_loss" in data or time.time() > deadline:
            break
        time.sleep(0.5)
    with open(os.path.join(logs, "wb", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_loss" in r]
    for key in (b"train_loss", b"val_loss", b"lr", b"tokens_per_s", b"tokens"):
        assert key in data, key
    for value in [r["train_loss"] for r in train] + [r["val_loss"] for r in val]:
        assert json.dumps(value).encode() in data, value  # each step's value, read back from the run file


def test_wandb_failure_does_not_stop_training(tmp_path, char_data, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise RuntimeError("no account")
    monkeypatch.setattr(wandb, "init", refuse)
    logs = str(tmp_path / "logs")
    result = train_gpt.main(tiny_args(char_data, logs, wandb=True, max_iters=3, warmdown_iters=1))
    assert result["steps"] == 3
    assert "wandb did not start (RuntimeError: no account); training continues without it" in run_log_text(logs)
