"""run.sh's decisions without GPUs: RUN_SH_GPUS stands in for the GPU count and RUN_SH_DRY_RUN=1 prints the
commands (the FineWeb fetch, then torchrun or the CPU run) instead of running them."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(gpus, *args):
    env = {**os.environ, "RUN_SH_GPUS": str(gpus), "RUN_SH_DRY_RUN": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("gpus, args, nproc, fetch_iters", [
    (8, ["--max_iters=500", "--recipe", "classic"], 8, 500),  # 8 accumulation steps: one each
    (6, [], 4, 5000),  # 512 sequences cannot be shared by 6 or 5: 4 is the most that can
    (16, ["--max_iters", "20"], 16, 20),  # 16 share the 512 sequences as one micro-batch of 32 each
    (12, ["--grad_accum_steps", "3", "--batch_size", "16"], 12, 5000),  # the passed-through batch decides
    (7, ["--grad_accum_steps", "3", "--batch_size", "5"], 5, 5000),  # 15 sequences: 5 processes of 3
])
def test_gpu_branch(gpus, args, nproc, fetch_iters):
    result = dry_run(gpus, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"python data/cached_fineweb10B.py --preset gpt2_124m --max_iters {fetch_iters}",
        f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py --preset gpt2_124m {' '.join(args)}".rstrip()]
    if nproc == gpus:
        assert result.stderr == ""
    else:
        sequences = 15 if "5" in args else 512
        assert result.stderr == (f"run.sh: using {nproc} of {gpus} GPUs, the most that can share the global batch "
                                 f"of {sequences} sequences\n")


def test_gpu_branch_passes_the_preset_to_the_fetch():
    result = dry_run(2, "--preset", "bottlecap", "--max_iters", "100")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "python data/cached_fineweb10B.py --preset bottlecap --max_iters 100",
        "torchrun --standalone --nproc_per_node=2 train_gpt.py --preset gpt2_124m --preset bottlecap --max_iters 100"]


def test_gpu_branch_bad_flag_is_one_line():
    result = dry_run(4, "--max_iters", "lots")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: argument --max_iters: invalid int value: 'lots'\n"


def test_cpu_branch():
    result = dry_run(0, "--max_iters", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "python train_gpt.py --preset shakespeare_char --device cpu --max_iters 5"
    prepared = os.path.isfile(os.path.join(ROOT, "data", "shakespeare_char", "meta.json"))
    prepare = "python data/shakespeare.py --mode char --out_dir data/shakespeare_char"
    assert lines[:-1] == ([] if prepared else [prepare])
    assert "torchrun" not in result.stdout and "cached_fineweb10B" not in result.stdout


@pytest.mark.parametrize("gpus", [0, 8])
def test_check_fetches_and_prepares_nothing(gpus):
    result = dry_run(gpus, "--check")
    assert result.returncode == 0, result.stderr
    launcher = "torchrun --standalone --nproc_per_node=8 train_gpt.py --preset gpt2_124m" if gpus else \
        "python train_gpt.py --preset shakespeare_char --device cpu"
    assert result.stdout.splitlines() == [f"{launcher} --check"]


def test_bad_gpu_override():
    result = dry_run("two")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: RUN_SH_GPUS=two is not a GPU count: unset it, or set a whole number\n"


def test_a_dry_run_setting_that_is_not_0_or_1_is_refused_before_anything_runs():
    env = {**os.environ, "RUN_SH_DRY_RUN": "yes", "RUN_SH_GPUS": "2"}
    result = subprocess.run(["bash", os.path.join(ROOT, "run.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: RUN_SH_DRY_RUN=yes: set 1 to print the commands instead of running them, "
                             "or 0\n")


def test_a_gpu_count_too_large_for_bash_is_refused():
    result = dry_run("99999999999999999999")
    assert result.returncode == 2 and result.stdout == ""
    assert "is not a GPU count" in result.stderr
