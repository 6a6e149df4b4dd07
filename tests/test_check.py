"""`train_gpt.py --check`: everything a run resolves, nothing trained or written; exit 0 when the run can start,
exit 2 with one line when it cannot, for one process and under torchrun."""
import os
import subprocess
import sys

import train_gpt
from conftest import ROOT, tiny_args


def check(args, nproc=1):
    prefix = [sys.executable, os.path.join(ROOT, "train_gpt.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         os.path.join(ROOT, "train_gpt.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(prefix + ["--check", *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


def test_check_reports_what_the_run_would_use_and_writes_nothing(tmp_path, char_data, capsys):
    logs = str(tmp_path / "logs")
    assert train_gpt.main(["--check", *tiny_args(char_data, logs, max_iters=100)]) is None
    out = capsys.readouterr().out
    assert out.startswith("check: python:") and " torch:" in out.splitlines()[0]
    assert f"check: training data {char_data}/train_*.bin: 1 shard(s), 8,856 tokens; max_iters 100 reads 6,400 " \
           "(0.72 passes)" in out
    assert "check: batch: 64 tokens per step = 1 process(es) x 1 micro-batch(es) x 4 sequences x 16 tokens" in out
    assert "check: device cpu: " in out and "check: memory about " in out and "check: precision fp32, " in out
    assert out.endswith("check: the run can start\n")
    assert not os.path.exists(logs)


def test_check_refuses_too_few_shards_with_one_line(tmp_path, char_data):
    result = check(tiny_args(char_data, str(tmp_path / "logs"), max_iters=1000, max_data_passes=1))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "error: --max_iters 1000 reads 64,000 tokens, 7.23 passes over the 1 training shard(s) (8,856 tokens) where "
        "--max_data_passes allows 1: fetch more shards")


def test_a_run_refuses_a_model_too_big_for_memory_before_its_log_exists(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    huge = tiny_args(char_data, logs, n_layer=48, n_embd=16384, n_head=4)
    for args in (huge, ["--check", *huge]):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"), *args], capture_output=True,
                                text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: a training step needs about ") and "lower --batch_size" in \
            result.stderr
        assert not os.path.exists(logs)


def test_check_under_torchrun_connects_the_processes(tmp_path, char_data):
    result = check(tiny_args(char_data, str(tmp_path / "logs")), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check: batch: 64 tokens per step = 2 process(es) x 1 micro-batch(es) x 2 sequences x 16 tokens" in \
        result.stdout
    assert "(ranks [0, 1])" in result.stdout
    assert "check: 2 processes (gloo) reached each other: all-reduce and barrier " in result.stdout
    assert result.stdout.endswith("check: the run can start\n")


def test_check_under_torchrun_refuses_a_batch_the_processes_cannot_share(tmp_path, char_data):
    result = check(tiny_args(char_data, str(tmp_path / "logs"), batch_size=3), nproc=2)
    assert result.returncode != 0 and "the run can start" not in result.stdout
    assert "error: the global batch of 3 sequences (--batch_size 3 x --grad_accum_steps 1) cannot be shared evenly " \
           "by 2 processes: run [1, 3] processes" in result.stderr


def test_check_under_torchrun_names_the_rank_that_cannot_start(tmp_path, char_data):
    result = check(tiny_args(char_data, str(tmp_path / "logs"), max_iters=1000, max_data_passes=1), nproc=2)
    assert result.returncode != 0
    assert "error: rank 0: --max_iters 1000 reads 64,000 tokens" in result.stderr
