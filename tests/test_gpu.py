"""MFU peaks per GPU and the fallbacks for GPUs that lack something (on the CPU, by patching what the code reads),
and the CUDA checks, marked `cuda`: they skip without a GPU, and bench/gpu_check.py runs them on one."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import ROOT, fake_gpu, read_metrics, run_log_text, tiny_args

cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 3090", 71e12), ("NVIDIA GeForce GTX 1080", None), ("Tesla T4", None)])
def test_mfu_peak_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train_gpt.peak_flops(torch.device("cuda", 0)) == peak


def test_no_mfu_on_cpu():
    assert train_gpt.peak_flops(torch.device("cpu")) is None


# --- fallbacks: what a GPU lacks is replaced, and the log says so

def test_an_ampere_or_newer_gpu_keeps_bf16_and_compile(monkeypatch):
    fake_gpu(monkeypatch, capability=(9, 0))
    cfg = train_gpt.resolve_config(["--preset", "gpt2_124m"])
    assert (cfg.device, cfg.precision, cfg.compile, cfg.notes) == ("cuda", "bf16", True, ())


def test_bf16_without_bf16_tensor_cores_becomes_fp16_with_the_grad_scaler(monkeypatch):
    fake_gpu(monkeypatch, capability=(7, 5), name="Tesla T4", memory_gib=16)
    cfg = train_gpt.resolve_config(["--preset", "gpt2_124m"])
    assert cfg.precision == "fp16"
    assert any(n.startswith("fallback: Tesla T4 (compute capability 7.5) has no bf16 tensor cores, so fp16 with the "
                            "GradScaler") for n in cfg.notes)
    assert any("has no TF32" in n for n in cfg.notes)
    assert train_gpt.resolve_config(["--preset", "gpt2_124m", "--precision", "fp32"]).precision == "fp32"


def test_compile_without_a_working_triton_runs_eager(monkeypatch):
    fake_gpu(monkeypatch, triton=False)
    cfg = train_gpt.resolve_config(["--preset", "gpt2_124m"])
    assert cfg.compile is False and cfg.precision == "bf16"
    assert cfg.notes == ("fallback: torch.compile needs a working Triton for NVIDIA H100 80GB HBM3 (compute "
                         "capability 9.0), so the model runs eager",)


def test_fallback_notes_are_logged(tmp_path, char_data, monkeypatch):
    notes = ("fallback: a note for the log",)
    real = train_gpt.derive
    monkeypatch.setattr(train_gpt, "derive", lambda *a, **k: train_gpt.dataclasses.replace(real(*a, **k),
                                                                                          notes=notes))
    logs = str(tmp_path / "logs")
    train_gpt.main(tiny_args(char_data, logs, max_iters=2, warmdown_iters=1, eval_interval=0))
    assert "\nfallback: a note for the log\n" in run_log_text(logs)


def test_tf32_is_set_only_where_it_exists(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    for capability, expected in [((7, 0), []), ((8, 0), ["high"])]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        calls.clear()
        train_gpt.allow_tf32(torch.device("cuda", 0))
        assert calls == expected


# --- on a GPU (pytest -m cuda; bench/gpu_check.py fails a skip there)

def on_gpu(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@on_gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_runs_report_mfu(tmp_path, char_data, precision):
    logs = str(tmp_path / "logs")
    train_gpt.main(tiny_args(char_data, logs, device="cuda", precision=precision, compile=precision == "bf16",
                             max_iters=6, eval_interval=3))
    rows = [r for r in read_metrics(logs) if "train_loss" in r]
    assert rows and all(r["train_loss"] == r["train_loss"] for r in rows)
    if train_gpt.peak_flops(torch.device("cuda", 0)) is not None:
        assert all(r["mfu"] is not None and r["mfu"] > 0 for r in rows)
    if precision == "fp16":
        assert all(r["grad_scale"] > 0 for r in rows)


@on_gpu
def test_fused_gqa_matches_repeated_keys_and_values():
    torch.manual_seed(0)
    cfg = train_gpt.GPTConfig(vocab_size=64, block_size=128, n_layer=1, n_head=8, n_kv_head=2, n_embd=256)
    attn = train_gpt.CausalSelfAttention(cfg).cuda()
    x = torch.randn(2, 128, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = attn(x)  # enable_gqa on the fused kernel
    repeated = attn(x)  # fp32: the keys and values repeated per query head
    torch.testing.assert_close(fused.float(), repeated, atol=3e-2, rtol=3e-2)


@on_gpu
def test_muon_on_cuda_matches_torch_muon():
    torch.manual_seed(0)
    ours = [torch.randn(64, 32, device="cuda", requires_grad=True), torch.randn(48, 96, device="cuda",
                                                                              requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_a = train_gpt.Muon(ours, lr=0.02, ns_dtype=torch.bfloat16)
    opt_b = torch.optim.Muon(theirs, lr=0.02)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@on_gpu
def test_a_non_finite_step_changes_nothing_on_cuda():
    p = torch.nn.Parameter(torch.randn(8, 8, device="cuda"))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones_like(p)
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full_like(p, float("nan"))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    applied, _ = train_gpt.optimizer_step([opt], scaler, [p], grad_clip=1.0)
    assert not applied.item()
    assert torch.equal(p, before[0])
    for key, value in opt.state[p].items():
        assert torch.equal(value, before[1][key]), key


@on_gpu
def test_measured_peak_memory_is_within_the_estimate(tmp_path, char_data):
    """estimate_train_memory decides micro-batches and refuses runs: a step must not need more than it says."""
    cfg = train_gpt.resolve_config(tiny_args(char_data, str(tmp_path / "logs"), device="cuda", precision="bf16",
                                             n_layer=4, n_embd=256, n_head=4, block_size=256, batch_size=32))
    trainer = train_gpt.Trainer(cfg, log=lambda line: None)
    trainer.setup()
    torch.cuda.reset_peak_memory_stats()
    for step in range(2):
        trainer.train_step(step)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() <= trainer.memory_needed


# --- bench/gpu_check.py, rehearsed on the CPU so that it cannot rot before a GPU comes

def gpu_check(tmp_path, *args):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu",
                             "--out", str(out), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    with open(out / "report.json") as f:
        return result, json.load(f), (out / "report.md").read_text()


def test_gpu_check_runs_its_parts_on_the_cpu(tmp_path):
    # Under --eager on the CPU the "eager" part repeats the "compiled" one, and "mtp2" differs from it by one flag
    # (the gpt2_124m dress rehearsal trains with MTP): the other parts are the rehearsal's own.
    result, report, markdown = gpu_check(tmp_path, "--eager", "--steps", "1", "--only", "machine", "tests", "check",
                                         "compiled", "kv4")
    assert result.returncode == 0, result.stdout + result.stderr
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == ["machine", "tests", "check", "compiled", "kv4"]
    assert all(p["status"] == "ok" for p in parts.values())
    assert "torch:" in parts["machine"]["result"]["versions"]
    assert parts["tests"]["result"]["skipped"] >= 1  # the CUDA tests, collected and skipped without a GPU
    assert "check: the run can start" in parts["check"]["output"]
    for name in ("compiled", "kv4"):
        figures = parts[name]["result"]
        assert figures["tokens_per_s"] > 0 and figures["peak_memory_gib"] > 0 and figures["estimate_gib"] > 0
        assert figures["first_step_s"] > 0 and figures["loss"] > 0
    assert "kv_heads:4" in parts["kv4"]["result"]["model"] and "kv_heads:2" not in parts["compiled"]["result"]["model"]
    assert "aten::mm" in parts["compiled"]["result"]["profile"]
    assert "| compiled | `(preset)` |" in markdown and "## kv4: ok" in markdown


def test_gpu_check_keeps_to_its_budget_and_still_writes_the_report(tmp_path):
    result, report, markdown = gpu_check(tmp_path, "--budget_s", "1")
    assert result.returncode == 1
    assert [p["status"] for p in report["parts"]] == ["not run"] * 7
    assert "## machine: not run" in markdown
