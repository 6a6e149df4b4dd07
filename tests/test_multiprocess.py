"""The multi-process path on the CPU: any process count that can share the batch gives the single-process losses,
the README's torchrun commands run as written (Gloo), the loader says when data repeats, and gpt2_124m runs end
to end through compile, bf16, GQA, MTP and the optional model pieces."""
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train_gpt
from conftest import ROOT, TEXT, fake_gpu, needs_gpt2_files, make_char_data, read_metrics, run_log_text, tiny_args

SHORT = ["--max_iters", "8", "--eval_interval", "4", "--log_interval", "1", "--val_tokens", "4096",
         "--timing_warmup_steps", "0", "--warmdown_iters", "3", "--compile", "False"]


def readme_command(prefix):
    """The README's shell command that starts with prefix, continuation lines joined, comment dropped."""
    text = open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return shlex.split(line.split("#")[0])


@pytest.fixture
def workdir(tmp_path):
    """A folder laid out like the checkout: train_gpt.py and tiny data at data/shakespeare_char."""
    shutil.copy(os.path.join(ROOT, "train_gpt.py"), tmp_path)
    make_char_data(str(tmp_path / "data" / "shakespeare_char"), text=TEXT * 4, val_fraction=0.35)  # batch 48 fits
    return tmp_path


def run(command, cwd, **kwargs):
    """Starts a command; `torchrun` as the interpreter under test runs it, not whichever one is on the PATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if command[0] == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "warning" not in err.lower(), err  # multi-process runs print no warnings
    return out


def single_process(workdir, *flags):
    logs = str(workdir / "one")
    finish(run([sys.executable, "train_gpt.py", "--preset", "shakespeare_char", "--device", "cpu", *SHORT,
                "--log_dir", logs, *flags], workdir))
    return read_metrics(logs)


def assert_same_losses(a, b, tolerance=1e-4):
    """Step for step: the micro-batches differ in size, so sums round differently, within float tolerance."""
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        key = "val_loss" if "val_loss" in ra else "train_loss"
        assert ra["step"] == rb["step"] and abs(ra[key] - rb[key]) < tolerance, (ra, rb)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the batch split

@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6, 12])
@pytest.mark.parametrize("recipe, sequences", [("classic", 12), ("speedrun", 48)])
def test_shakespeare_char_runs_on_every_count_that_shares_its_batch(world_size, recipe, sequences):
    cfg = train_gpt.resolve_config(["--preset", "shakespeare_char", "--recipe", recipe, "--device", "cpu"],
                                   world_size)
    assert cfg.tokens_per_step == sequences * 64
    assert cfg.micro_batch_size * cfg.accum_steps_per_rank * world_size == sequences


@pytest.mark.parametrize("world_size", [3, 5, 6, 7])
def test_a_batch_no_count_can_share_is_refused_with_the_counts_that_can(world_size):
    with pytest.raises(train_gpt.UsageError, match=rf"512 sequences .* by {world_size} processes: run "
                                                   r"\[1, 2, 4, 8, 16, 32, 64\] processes, or change"):
        train_gpt.resolve_config(["--preset", "gpt2_124m", "--device", "cpu"], world_size)


def test_split_keeps_the_accumulation_when_it_divides():
    assert train_gpt.split_batch(64, 8, 8) == (64, 1)
    assert train_gpt.split_batch(64, 8, 16) == (32, 1)
    assert train_gpt.split_batch(12, 1, 4) == (3, 1)
    assert train_gpt.split_batch(4, 3, 2) == (3, 2)  # 12 sequences: 2 micro-batches of 3 on each of 2


# --- the README's commands, run as written

def test_readme_torchrun_cpu_command_matches_one_process(workdir):
    command = readme_command("torchrun --standalone --nproc_per_node=2 train_gpt.py --preset shakespeare_char")
    out = finish(run(command + [*SHORT, "--log_dir", str(workdir / "two")], workdir))
    assert "batch: 3,072 tokens per step = 2 process(es) x 1 micro-batch(es) x 24 sequences x 64 tokens" in out
    assert_same_losses(single_process(workdir), read_metrics(str(workdir / "two")))


@pytest.mark.parametrize("prefix", ["python train_gpt.py --check",
                                    "torchrun --standalone --nproc_per_node=2 train_gpt.py --check"])
def test_readme_check_commands_run_as_written(workdir, prefix):
    command = readme_command(prefix)
    if command[0] == "python":
        command[0] = sys.executable
    out = finish(run(command, workdir))
    assert out.endswith("check: the run can start\n") and not (workdir / "logs").exists()


def test_three_processes_match_one_process(workdir):
    """With the optional model pieces on, which must work under torchrun like the rest."""
    pieces = ["--ngram_embed", "4", "--embed_shortcut", "True", "--smear", "True", "--value_embed", "True",
              "--value_gate", "True", "--value_tables", "2", "--unet_skips", "True", "--muon_momentum_warmup", "3",
              "--tied_head_steps", "3"]
    command = ["torchrun", "--standalone", "--nproc_per_node=3", "train_gpt.py", "--preset", "shakespeare_char",
               "--device", "cpu", *SHORT, *pieces, "--log_dir", str(workdir / "three")]
    out = finish(run(command, workdir))
    assert "3 process(es) x 1 micro-batch(es) x 16 sequences" in out and "untie: from step 3 on" in out
    assert_same_losses(single_process(workdir, *pieces), read_metrics(str(workdir / "three")))


def test_readme_multi_node_command_as_two_nodes_on_one_machine(workdir):
    command = readme_command("torchrun --nnodes=2 --node_rank=0")
    launcher = command[:command.index("train_gpt.py")]
    launcher = [a.replace("HOST:29500", f"127.0.0.1:{free_port()}").replace("--nproc_per_node=8",
                                                                              "--nproc_per_node=1")
                for a in launcher]
    assert launcher[:2] == ["torchrun", "--nnodes=2"] and any("--rdzv_backend=c10d" == a for a in launcher)
    flags = ["train_gpt.py", "--preset", "shakespeare_char", "--device", "cpu", *SHORT, "--run_id", "nodes",
             "--log_dir", str(workdir / "nodes")]
    nodes = [run([a.replace("--node_rank=0", f"--node_rank={rank}") for a in launcher] + flags, workdir)
             for rank in (0, 1)]
    for node in nodes:
        finish(node)
    assert_same_losses(single_process(workdir), read_metrics(str(workdir / "nodes")))


# --- data that repeats is said so

def test_the_log_says_when_another_pass_over_the_data_begins(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    # 8,856 train tokens make 553 windows of 16: 17 batches of 32 windows per pass, so step 18 starts pass 2
    train_gpt.main(tiny_args(char_data, logs, batch_size=32, max_iters=20, warmdown_iters=2, eval_interval=0))
    text = run_log_text(logs)
    assert re.findall(r"^data: pass \d+ begins at step:\d+$", text, re.M) == ["data: pass 2 begins at step:18"]


# --- MFU counts what the step computes

@pytest.mark.parametrize("mtp_steps, n_kv_head, tie, pieces", [(1, 4, False, False), (3, 2, False, False),
                                                                 (1, 4, True, False), (2, 2, False, True)])
def test_flops_per_token_matches_torch_flop_counter(mtp_steps, n_kv_head, tie, pieces):
    cfg = train_gpt.GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                              mtp_steps=mtp_steps, tie_embeddings=tie, pos_emb="learned" if tie else "rope",
                              ngram_embed=4 if pieces else 0, embed_shortcut=pieces, smear=pieces,
                              value_embed=pieces, unet_skips=pieces)
    model = train_gpt.GPT(cfg)
    x = torch.randint(0, 128, (2, 32))
    y = torch.randint(0, 128, (mtp_steps, 2, 32))
    # SDPA's math path is plain matmuls that the counter sees (it does not count the CPU's fused kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _, _ = model(x, y)
        loss.backward()
    # the head's loss recomputes each offset's logits in the backward pass (HeadLoss): one product more, which the
    # model's FLOPs (MFU's numerator) leave out
    recomputed = 2 * cfg.n_embd * cfg.vocab_size * x.numel() * mtp_steps
    assert train_gpt.flops_per_token(model) * x.numel() + recomputed == counter.get_total_flops()


# --- gpt2_124m through the GPU's code path, on the CPU

@needs_gpt2_files
def test_gpt2_124m_dress_rehearsal_on_cpu(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(open(os.path.join(ROOT, "README.md")).read() * 4)  # > 20,000 tokens: two full shards
    data = tmp_path / "gpt2"
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "fineweb.py"), "--input", str(text), "--out_dir",
                    str(data), "--workers", "1", "--no_progress", "--shard_size", "10000"], check=True,
                   capture_output=True, timeout=300)
    logs = str(tmp_path / "logs")
    # the preset's bf16 where this CPU computes it natively; emulated, it made this test take minutes
    precision = "bf16" if train_gpt.cpu_has_native_bf16() else "fp32"
    result = train_gpt.main([
        "--preset", "gpt2_124m", "--device", "cpu", "--n_layer", "2", "--n_embd", "192", "--batch_size", "2",
        "--grad_accum_steps", "1", "--block_size", "256", "--max_iters", "5", "--eval_interval", "5",
        "--log_interval", "1", "--warmdown_iters", "2", "--val_tokens", "512", "--timing_warmup_steps", "1",
        "--compile", "True",
        "--precision", precision, "--n_kv_head", "4", "--mtp_steps", "2", "--log_dir", logs,
        "--ngram_embed", "4", "--embed_shortcut", "True", "--smear", "True", "--value_embed", "True",
        "--value_gate", "True",
        "--input_bin", str(data / "train_000001.bin"), "--input_val_bin", str(data / "val_000000.bin")])
    rows = read_metrics(logs)
    assert result["steps"] == 5 and len([r for r in rows if "train_loss" in r]) == 5
    assert all(torch.isfinite(torch.tensor(r.get("train_loss", r.get("val_loss")))) for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


# --- a GPU with less memory than the preset assumes

def test_micro_batch_shrinks_to_fit_a_smaller_gpu_unless_batch_size_is_given(monkeypatch):
    Properties = fake_gpu(monkeypatch, memory_gib=24)
    cfg = train_gpt.resolve_config(["--preset", "gpt2_124m", "--device", "cuda"])
    assert (cfg.micro_batch_size, cfg.accum_steps_per_rank, cfg.tokens_per_step) == (32, 16, 524_288)
    assert "batch: a micro-batch of 64 needs about" in cfg.notes[0] and "24.0 GiB" in cfg.notes[0]
    gcfg = train_gpt.gpt_config(cfg, train_gpt.GPT2_VOCAB_SIZE)
    assert train_gpt.estimate_train_memory(gcfg, 32, "bf16") <= 0.9 * Properties.total_memory
    assert train_gpt.estimate_train_memory(gcfg, 64, "bf16") > 0.9 * Properties.total_memory
    explicit = train_gpt.resolve_config(["--preset", "gpt2_124m", "--device", "cuda", "--batch_size", "64"])
    assert (explicit.micro_batch_size, explicit.accum_steps_per_rank, explicit.notes) == (64, 8, ())
    Properties.total_memory = 80 * 2 ** 30
    roomy = train_gpt.resolve_config(["--preset", "gpt2_124m", "--device", "cuda"])
    assert (roomy.micro_batch_size, roomy.accum_steps_per_rank) == (64, 8)
