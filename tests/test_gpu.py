"""MFU peaks per GPU, and a CUDA run (skipped without a GPU)."""
import pytest
import torch

import train_gpt
from conftest import read_metrics, tiny_args


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 3090", 71e12), ("NVIDIA GeForce GTX 1080", None), ("Tesla T4", None)])
def test_mfu_peak_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train_gpt.peak_flops(torch.device("cuda", 0)) == peak


def test_no_mfu_on_cpu():
    assert train_gpt.peak_flops(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_compiled_run_reports_mfu(tmp_path, char_data):
    logs = str(tmp_path / "logs")
    train_gpt.main(tiny_args(char_data, logs, device="cuda", precision="bf16", compile=True, max_iters=6,
                             eval_interval=3))
    rows = [r for r in read_metrics(logs) if "train_loss" in r]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)
    if train_gpt.peak_flops(torch.device("cuda", 0)) is not None:
        assert all(r["mfu"] is not None and r["mfu"] > 0 for r in rows)
