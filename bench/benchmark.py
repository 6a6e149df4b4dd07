#!/usr/bin/env python3
"""Run named suites of train_gpt.py configurations, one subprocess at a time, and tabulate them in markdown.

Every run is `python train_gpt.py --preset PRESET --device cpu ...` started from the repository root (--preset:
a CPU track's, shakespeare_char by default), with --run_id <suite>_<name>_<seed>, --seed, --max_iters <steps>,
--eval_interval and the configuration's flags.

Suites:
  features    --recipe classic, all steps (--target_val_loss 0): multi-head attention against grouped-query
              attention (with and without --embd_scale) and multi-token prediction.
  optimizers  --recipe classic, all steps: a learning-rate sweep per optimizer at --sweep_steps (default --steps;
              grids in LR_GRID) on --sweep_seed, then every optimizer at its best rate for --steps on every seed
              (default 1338, a seed the sweep did not choose on; a seed/length the sweep already ran is reused).
  recipes     classic against speedrun to --target (the track's), alternating, for every seed, each on its own
              step budget (classic --steps; speedrun its settings' max_iters or --speedrun_steps) with the
              speedrun's settings on the preset (speedrun_settings); medians over seeds and their ratio. --ablate
              also runs the speedrun with one piece switched off (or one setting put back to the preset's, or a
              piece it lacks switched on) at a time, on every seed.

Usage:
  python bench/benchmark.py --suite features [--steps 2000] [--seeds 1337]
  python bench/benchmark.py --suite optimizers [--steps 2000] [--sweep_steps 2000] [--seeds 1338]
  python bench/benchmark.py --suite recipes [--steps 3000] [--seeds 1337 1338 1339] [--ablate]
  python bench/benchmark.py --suite recipes --preset shakespeare_gpt2 --steps 500     # the BPE track
  python bench/benchmark.py --suite features --steps 20 --only mha gqa1       # a smoke test of two configs
  python bench/benchmark.py --suite recipes --steps 8 --seeds 1 --data /tmp/tiny \\
      --extra "--n_layer 1 --n_embd 32 --n_head 2 --block_size 16 --batch_size 4"  # appended to every run

Data: --data DIR (default: the track's, records/<preset>/README.md) must hold train_*.bin and val_*.bin.
Output: each run writes <log_dir>/<run_id>.txt and <log_dir>/<run_id>/metrics.jsonl (default log_dir
logs/bench_<suite>_<timestamp>); the tables go to stdout and to --out (default <log_dir>/results.md), and every
parsed run to the same path with a .json suffix. When --steps is shorter than a recipe's warmup plus warmdown,
both are scaled down to fit half the run (smoke tests only; the header says so).
Exit code: 0 when every run succeeded, 1 when any failed (the tables still show them), 2 for bad usage or no data.
"""

import argparse
import contextlib
import datetime
import glob
import io
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import train_gpt  # noqa: E402  (the recipes' schedules, the log format and the torch version)
from bench.cli import UsageError, run_tool  # noqa: E402

sys.path.insert(0, str(ROOT / "records"))
import submit  # noqa: E402  (the tracks' rules: records/<track>/README.md's track table)

# The CPU tracks a benchmark runs on, and how to make each one's data; their data and target val loss come from
# the track table of records/<preset>/README.md (track_rules)
TRACKS = {
    "shakespeare_char": "make it with: python data/shakespeare.py --source tinyshakespeare "
                        "--input ../shared/data/tinyshakespeare.txt --out_dir data/tinyshakespeare_char",
    "shakespeare_gpt2": "make it with: python data/shakespeare.py --mode gpt2",
}
LOG = train_gpt.LOG_PATTERNS

# --- suites: names and flags (edit here)

FEATURES = {
    "mha": [],
    "gqa2": ["--n_kv_head", "2"],
    "gqa1": ["--n_kv_head", "1"],
    "gqa2_scaled": ["--n_kv_head", "2", "--embd_scale", "1.25"],
    "gqa1_scaled": ["--n_kv_head", "1", "--embd_scale", "1.25"],
    "mtp2": ["--mtp_enabled", "--mtp_max_steps", "2"],
    "mtp3": ["--mtp_enabled", "--mtp_max_steps", "3"],
}

# flag: the swept train_gpt.py flag; values: its grid, or multiples: a grid in multiples of --learning_rate;
# fixed: other flags for every point of the grid;
# learning_rate_from: take --learning_rate from that optimizer's best sweep point (FALLBACK_LR when not swept).
LR_GRID = {
    "adamw": dict(flag="learning_rate", values=[2e-3, 4e-3, 8e-3]),
    "adam": dict(flag="learning_rate", values=[2e-3, 4e-3, 8e-3]),
    "muon": dict(flag="muon_lr", values=[0.02, 0.05, 0.1], learning_rate_from="adamw"),
    "adamsn": dict(flag="sn_lr", multiples=[10, 15, 25], learning_rate_from="adamw"),
    "adafactor": dict(flag="adafactor_lr", values=[1e-2, 3e-2, 1e-1], learning_rate_from="adamw"),
}
FALLBACK_LR = 2e-3

RECIPES = ["classic", "speedrun"]

def track_rules(preset):
    """The track's data folder (data/ plus the folder of its train shards) and its target val loss."""
    rules = submit.read_track((ROOT / "records" / preset / "README.md").read_text(encoding="utf-8"), preset)
    return ROOT / "data" / Path(rules["train"]).parent, rules["target"]


def speedrun_settings(preset):
    """The speedrun's settings in the recipes suite: the recipe's own settings on the preset (its "recipes" entry),
    passed as flags so each log says them, with the preset's batch size where they keep it. max_iters is the step
    budget (--speedrun_steps overrides it; the warmdown stays WARMDOWN_FRACTION of it); eval_interval only sets how
    often the (untimed) validation checks for the target."""
    entry = train_gpt.PRESETS[preset]
    return {"batch_size": entry["batch_size"], **entry["recipes"]["speedrun"]}

# speedrun with one feature switched off (or swapped for classic's choice)
ABLATIONS = {
    "learned_pos_emb": ["--pos_emb", "learned"],
    "layer_norm": ["--norm", "layer"],
    "no_qk_norm": ["--qk_norm", "False"],
    "gelu_mlp": ["--mlp", "gelu"],
    "no_zero_init": ["--zero_init", "False"],
    "tied_embeddings": ["--tie_embeddings", "True", "--tied_head_steps", "0"],
    "no_softcap": ["--logit_softcap", "0"],
    "adamw": ["--optimizer", "adamw"],
    "cosine_schedule": ["--schedule", "cosine"],
    "no_ngram_embed": ["--ngram_embed", "0"],
    "bigram_only": ["--ngram_embed", "2"],
    "no_value_embed": ["--value_embed", "False", "--value_gate", "False"],
    "no_value_gate": ["--value_gate", "False"],
    "no_half_batch": ["--half_batch_steps", "0"],
    "no_head_untied_late": ["--tied_head_steps", "0"],
    # pieces off in a speedrun's settings, switched on
    "with_bigram_embed": ["--ngram_embed", "2"],
    "with_ngram_embed": ["--ngram_embed", "4"],
    "with_value_embed": ["--value_embed", "True"],
    "with_value_gate": ["--value_embed", "True", "--value_gate", "True"],
    "with_two_value_tables": ["--value_tables", "2"],
    # pieces tried and not adopted: the speedrun with one of them switched on
    "with_embed_shortcut": ["--embed_shortcut", "True"],
    "with_smear": ["--smear", "True"],
    "with_unet_skips": ["--unet_skips", "True"],
    "with_muon_momentum_warmup": ["--muon_momentum_warmup", "20"],
    "with_head_untied_at_73": ["--tied_head_steps", "73"],  # two thirds of shakespeare_gpt2's 110 steps
    "adam_beta1_0.6": ["--beta1", "0.6"],
    "adam_beta1_0.9": ["--beta1", "0.9"],
}

# speedrun settings that ablation rows put back, one row each: to the preset's or the default (the preset's batch
# runs the same tokens: 4x the steps), or to earlier speedrun settings: the rates the batch-48 speedrun had before
# its rates were swept (one Adam-family rate for embedding, head and gains), and Muon's rate before the n-gram tables;
# or to settings tried and not adopted (a deeper model, the public GPT-2 speedrun's larger soft-cap)
SETTING_ABLATIONS = {
    "preset_batch": dict(batch_size=12),
    "no_compile": dict(compile=False),
    "previous_rates": dict(learning_rate=6e-3, muon_lr=0.05, embed_lr=0.0, head_lr=0.0),
    "four_heads": dict(n_head=4),
    "muon_lr_0.035": dict(muon_lr=0.035),
    "eight_layers": dict(n_layer=8),
    "softcap_30": dict(logit_softcap=30.0),
}

SUITE_DEFAULTS = {
    "features": dict(seeds=[1337], eval_interval=250),
    "optimizers": dict(seeds=[1338], eval_interval=250),
    "recipes": dict(seeds=[1337, 1338, 1339], eval_interval=50),
}


def suite_names(suite):
    """The names --only may pick for a suite."""
    return {"features": list(FEATURES), "optimizers": list(LR_GRID),
            "recipes": RECIPES + list(ABLATIONS) + list(SETTING_ABLATIONS)}[suite]


def settings_flags(settings):
    """train_gpt.py flags for a settings dict, without max_iters (a run's step budget is passed on its own)."""
    return [t for key, value in settings.items() if key != "max_iters"
            for t in (f"--{key}", value if isinstance(value, str) else f"{value:g}" if isinstance(value, float)
                      else str(value))]


# --- formatting

def fmt_duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_cell(value, spec=""):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = format(value, spec) if spec and isinstance(value, (int, float)) else str(value)
    return text.replace("|", "\\|")


def markdown_table(rows, columns):
    """rows: dicts. columns: (header, key, spec) triples; key is a row key or a function of the row, spec a format
    spec for numbers. Missing values show as n/a; columns with a spec (numbers) are right-aligned, the rest left."""
    headers = [header for header, _, _ in columns]
    cells = [[format_cell(key(row) if callable(key) else row.get(key), spec) for _, key, spec in columns]
             for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = [bool(spec) for _, _, spec in columns]

    def line(items):
        return "| " + " | ".join(t.rjust(w) if r else t.ljust(w) for t, w, r in zip(items, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else ":" + "-" * (w + 1) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def failure_notes(results):
    return "\n".join(f"- `{r['run_id']}` failed: {r['error']}" for r in results if not r["ok"])


def machine_line():
    return (f"machine: {train_gpt.cpu_model()}, {os.cpu_count()} cores; torch {train_gpt.torch.__version__}; "
            f"python {platform.python_version()}; {datetime.datetime.now():%Y-%m-%d %H:%M}")


# --- reading a run's log and metrics

def parse_run(log_path, metrics_path):
    """What a finished run's log and metrics.jsonl say. Raises ValueError when they are missing or incomplete."""
    if not os.path.exists(log_path) or not os.path.exists(metrics_path):
        raise ValueError(f"no log or metrics.jsonl for {log_path}")
    with open(log_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if train_gpt.LOG_SEPARATOR not in lines:
        raise ValueError(f"{log_path}: no separator line after the source")
    body = lines[lines.index(train_gpt.LOG_SEPARATOR) + 1:]  # the source above may hold any text
    header = {}
    for match in filter(None, map(LOG["header"].match, body)):
        header.setdefault(match.group(1), match.group(2) or "")
    keys = ("params", "tokens_per_step", "half_batch_steps")
    out = {key: int(header[key]) if header.get(key, "").isdigit() else None for key in keys}
    state = next(filter(None, map(LOG["optimizer_state"].match, body)), None)
    out["state_bytes"] = int(state.group(2).replace(",", "")) if state else None
    out["state_ratio"] = float(state.group(3)) if state else None
    last = next((line for line in reversed(lines) if line.strip()), "")
    reached, missed = LOG["reached"].match(last), LOG["not_reached"].match(last)
    if not (reached or missed):
        raise ValueError(f"{log_path}: the last line is not a target val_loss line")
    out["reached"] = bool(reached)
    out["reached_step"] = int(reached.group(2)) if reached else None
    out["reached_time_s"] = int(reached.group(3)) / 1000 if reached else None
    out["reached_tokens"] = train_gpt.tokens_read(out["reached_step"], out["tokens_per_step"],
                                                  out["half_batch_steps"] or 0) \
        if reached and out["tokens_per_step"] else None

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    val = [r for r in rows if "val_loss" in r and "screen_tokens" not in r]  # a screen is no candidate for best
    train = [r for r in rows if "train_loss" in r]
    if not val:
        raise ValueError(f"{metrics_path}: no val rows")
    best = min(val, key=lambda r: r["val_loss"])
    out.update(final_val_loss=val[-1]["val_loss"], best_val_loss=best["val_loss"], best_step=best["step"],
               steps=max(r["step"] for r in rows), train_time_s=max(r["train_time_ms"] for r in rows) / 1000)
    last_train = train[-1] if train else None
    out["tokens_per_s"] = last_train["tokens"] / (last_train["train_time_ms"] / 1000) \
        if last_train and last_train["train_time_ms"] > 0 else None
    return out


# --- running one configuration

class Progress:
    """Prints `[i/N] label ... elapsed 4m10s, eta 6m` before each run; the ETA assumes the time per step so far."""

    def __init__(self, runs, steps):
        self.runs, self.steps_left = runs, steps
        self.index, self.steps_done, self.train_seconds = 0, 0, 0.0
        self.start = time.time()

    def begin(self, label):
        self.index += 1
        elapsed = time.time() - self.start
        eta = fmt_duration(self.train_seconds / self.steps_done * self.steps_left) if self.steps_done else "?"
        print(f"[{self.index}/{self.runs}] {label} ... elapsed {fmt_duration(elapsed)}, eta {eta}", flush=True)

    def skip(self, runs, planned_steps):
        self.runs -= runs
        self.steps_left = max(0, self.steps_left - planned_steps)

    def end(self, planned_steps, steps_done, seconds):
        self.steps_left = max(0, self.steps_left - planned_steps)
        if steps_done:
            self.steps_done += steps_done
            self.train_seconds += seconds


class Bench:
    """What every run of one benchmark shares."""

    def __init__(self, args, progress):
        self.suite, self.preset, self.data, self.log_dir = args.suite, args.preset, args.data, args.log_dir
        self.eval_interval, self.extra, self.progress = args.eval_interval, args.extra_flags, progress
        self.results = []
        # features and optimizers run every step; recipes stop at the target (the preset's unless --target)
        if args.suite != "recipes":
            self.target_flags = ["--target_val_loss", "0"]
        else:
            self.target_flags = ["--target_val_loss", f"{args.target:g}"] if args.target is not None else []


def schedule_note(preset, recipe, steps):
    """How train_gpt.py shortens the recipe's warmup/warmdown to fit `steps` (its short-run note), or None."""
    cfg = train_gpt.resolve_config(["--preset", preset, "--device", "cpu", "--recipe", recipe,
                                    "--max_iters", str(steps), "--run_id", "schedule_note"])
    return next((note for note in cfg.notes if note.startswith("short-run:")), None)


def run_config(bench, name, flags, seed, steps, recipe, label=None):
    """Runs train_gpt.py once and returns a dict: the run's identity, ok/error, and parse_run's numbers."""
    run_id = f"{bench.suite}_{name}_{seed}"
    argv = ["--preset", bench.preset, "--device", "cpu", "--recipe", recipe,
            "--input_bin", os.path.join(bench.data, "train_*.bin"),
            "--input_val_bin", os.path.join(bench.data, "val_*.bin"),
            "--run_id", run_id, "--log_dir", bench.log_dir, "--seed", str(seed),
            *(["--max_iters", str(steps)] if steps else []),  # None: the recipe's
            "--eval_interval", str(bench.eval_interval), *bench.target_flags, *flags, *bench.extra]
    result = dict(name=name, seed=seed, run_id=run_id, recipe=recipe, flags=" ".join(flags), argv=argv)
    log_path, metrics_path = (os.path.join(bench.log_dir, f"{run_id}.txt"),
                              os.path.join(bench.log_dir, run_id, "metrics.jsonl"))
    # a rerun into the same --log_dir replaces the run: train_gpt.py refuses a run_id whose files exist
    if os.path.exists(log_path):
        os.remove(log_path)
    shutil.rmtree(os.path.join(bench.log_dir, run_id), ignore_errors=True)
    bench.progress.begin(label or f"{name} seed {seed}")
    start = time.time()
    proc = subprocess.run([sys.executable, "train_gpt.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    result.update(wall_s=time.time() - start, returncode=proc.returncode, ok=proc.returncode == 0, error=None)
    if proc.returncode:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "")
        result["error"] = f"exit {proc.returncode}: {last.strip()}"
    else:
        try:
            result.update(parse_run(log_path, metrics_path))
        except ValueError as e:
            result.update(ok=False, error=str(e))
    bench.progress.end(steps or result.get("steps") or 0, result.get("steps") or 0, result["wall_s"])
    if result["ok"]:
        outcome = f"reached at step {result['reached_step']}" if result["reached"] else \
            f"best val {result['best_val_loss']:.4f}"
        print(f"    done in {fmt_duration(result['wall_s'])}: final val {result['final_val_loss']:.4f}, {outcome}",
              flush=True)
    else:
        print(f"    FAILED: {result['error']}", flush=True)
    bench.results.append(result)
    return result


def mean(values):
    """The mean, or None when there is nothing (or something missing) to average."""
    return sum(values) / len(values) if values and None not in values else None


def mean_over_seeds(results):
    """One row per name: the mean of every number over the runs that succeeded, and `runs` = 'ok/total'."""
    rows = {}
    for r in results:
        rows.setdefault(r["name"], []).append(r)
    out = []
    for name, runs in rows.items():
        good = [r for r in runs if r["ok"]]
        row = dict(name=name, flags=runs[0]["flags"], runs=f"{len(good)}/{len(runs)}")
        for key in (good[0] if good else {}):
            values = [r[key] for r in good]
            if key not in row and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                row[key] = mean(values)
        out.append(row)
    return out


# --- suites

def features_suite(bench, args, report):
    configs = {n: f for n, f in FEATURES.items() if n in args.only}
    for name, flags in configs.items():
        for seed in args.seeds:
            run_config(bench, name, flags, seed, args.steps, "classic")
    columns = [("config", "name", ""), ("params", "params", ",.0f"),
               ("final val loss", "final_val_loss", ".4f"), ("best val loss", "best_val_loss", ".4f"),
               ("tokens/s", "tokens_per_s", ",.0f"), ("train time (s)", "train_time_s", ".1f"),
               ("runs ok", "runs", "")]
    report.add(f"## features: {args.steps} steps, classic recipe",
               markdown_table(mean_over_seeds(bench.results), columns), failure_notes(bench.results))


def features_plan(args):
    runs = len([n for n in FEATURES if n in args.only]) * len(args.seeds)
    return runs, runs * args.steps


def sweep_points(opt, best_lr):
    """(name, flags, value) for each point of an optimizer's grid; best_lr: the best --learning_rate per optimizer."""
    grid = LR_GRID[opt]
    fixed = dict(grid.get("fixed", {}))
    if "learning_rate_from" in grid:
        fixed["learning_rate"] = best_lr.get(grid["learning_rate_from"], FALLBACK_LR)
    base = ["--optimizer", opt] + [t for k, v in fixed.items() for t in (f"--{k}", f"{v:g}")]
    values = grid["values"] if "values" in grid else [round(m * fixed["learning_rate"], 12) for m in grid["multiples"]]
    return [(f"sweep_{opt}_{v:g}", base + [f"--{grid['flag']}", f"{v:g}"], v) for v in values]


def optimizers_suite(bench, args, report):
    opts = [o for o in LR_GRID if o in args.only]
    best_flags, best_run, best_lr, sweep_rows, sweep_results = {}, {}, {}, [], []
    for opt in opts:
        points = []
        for name, flags, value in sweep_points(opt, best_lr):
            label = f"sweep {opt} {LR_GRID[opt]['flag']}={value:g} seed {args.sweep_seed}"
            r = run_config(bench, name, flags, args.sweep_seed, args.sweep_steps, "classic", label=label)
            points.append((r, flags))
        finite = [(r, f) for r, f in points if r["ok"] and math.isfinite(r["final_val_loss"])]
        best = min(finite, key=lambda p: p[0]["final_val_loss"]) if finite else (None, None)
        if best[0] is not None:
            best_flags[opt], best_run[opt] = best[1], best[0]
            if "--learning_rate" in best[1]:
                best_lr[opt] = float(best[1][best[1].index("--learning_rate") + 1])
        sweep_rows += [dict(r, optimizer=opt, chosen=r is best[0]) for r, _ in points]
        sweep_results += [r for r, _ in points]
    sweep_columns = [("optimizer", "optimizer", ""), ("flags", "flags", ""),
                     ("final val loss", "final_val_loss", ".4f"), ("best val loss", "best_val_loss", ".4f"),
                     ("tokens/s", "tokens_per_s", ",.0f"), ("chosen", "chosen", "")]
    report.add(f"## optimizers: learning-rate sweep, {args.sweep_steps} steps, seed {args.sweep_seed}",
               markdown_table(sweep_rows, sweep_columns), failure_notes(sweep_results))
    finals = []
    for opt in opts:
        if opt not in best_flags:
            print(f"{opt}: every sweep run failed; no full run", flush=True)
            bench.progress.skip(len(args.seeds), len(args.seeds) * args.steps)
            continue
        for seed in args.seeds:
            if (seed, args.steps) == (args.sweep_seed, args.sweep_steps):  # the sweep already ran this exact run
                finals.append(dict(best_run[opt], name=opt))
                continue
            finals.append(run_config(bench, opt, best_flags[opt], seed, args.steps, "classic"))
    rows = mean_over_seeds(finals)
    adamw = next((r for r in rows if r["name"] == "adamw" and "final_val_loss" in r), None)
    for r in rows:
        r["best_flags"] = " ".join(best_flags[r["name"]][2:])  # without the leading --optimizer X
        if adamw and "final_val_loss" in r:
            r["delta"] = r["final_val_loss"] - adamw["final_val_loss"]
    columns = [("optimizer", "name", ""), ("best lr flags", "best_flags", ""),
               ("final val loss", "final_val_loss", ".4f"), ("delta vs adamw", "delta", "+.4f"),
               ("state bytes", "state_bytes", ",.0f"), ("state / AdamW", "state_ratio", ".3f"),
               ("tokens/s", "tokens_per_s", ",.0f"), ("runs ok", "runs", "")]
    seeds = " ".join(map(str, args.seeds))
    report.add(f"## optimizers: {args.steps} steps at the best rate, classic recipe, seeds {seeds}",
               markdown_table(rows, columns), failure_notes(finals))


def optimizers_plan(args):
    opts = [o for o in LR_GRID if o in args.only]
    sweeps = sum(len(sweep_points(o, {})) for o in opts)
    finals = len([s for s in args.seeds if (s, args.steps) != (args.sweep_seed, args.sweep_steps)])
    return sweeps + len(opts) * finals, sweeps * args.sweep_steps + len(opts) * finals * args.steps


def median(values):
    """The median; None (a run that failed or missed the target) counts as slower than any time. None when more
    than half are None, or there is nothing."""
    if not values:
        return None
    ordered = sorted(values, key=lambda v: (v is None, v))
    mid = len(ordered) // 2
    pair = ordered[mid:mid + 1] if len(ordered) % 2 else ordered[mid - 1:mid + 1]
    return None if None in pair else sum(pair) / len(pair)


def speedrun_budget(args, settings=None):
    """The speedrun's --max_iters: --speedrun_steps or its settings', scaled to the same tokens when `settings`
    change the batch size."""
    steps = args.speedrun_steps or args.settings["max_iters"]
    batch = (settings or {}).get("batch_size", args.settings["batch_size"])
    return max(1, round(steps * args.settings["batch_size"] / batch))


def recipe_run(bench, args, recipe, seed):
    if recipe == "classic":
        return run_config(bench, recipe, [], seed, args.steps, recipe)
    return run_config(bench, recipe, settings_flags(args.settings), seed, speedrun_budget(args), recipe)


def time_summary(name, runs, **extra):
    """One row: how many runs reached the target, the median time/step/tokens to it, the mean best val loss."""
    reached = [r["reached_time_s"] if r["ok"] and r["reached"] else None for r in runs]
    hit = [r for r in runs if r["ok"] and r["reached"]]
    best = [r["best_val_loss"] for r in runs if r["ok"]]
    return dict(name=name, reached=f"{len(hit)}/{len(runs)}", time=median(reached),
                times=" ".join("-" if t is None else f"{t:.1f}" for t in reached),
                step=median([r["reached_step"] if r["ok"] and r["reached"] else None for r in runs]),
                tokens=median([r["reached_tokens"] if r["ok"] and r["reached"] else None for r in runs]),
                best=mean(best) if best else None, **extra)


def recipes_suite(bench, args, report):
    recipes = [r for r in RECIPES if r in args.only]
    runs = [recipe_run(bench, args, recipe, seed) for seed in args.seeds for recipe in recipes]
    target = f"{args.target:g}"
    columns = [("recipe", "name", ""), ("seed", "seed", "d"), ("reached", "reached", ""), ("step", "reached_step", "d"),
               ("train time (s)", "reached_time_s", ".1f"), ("tokens", "reached_tokens", ",.0f"),
               ("best val loss", "best_val_loss", ".4f"), ("final val loss", "final_val_loss", ".4f")]
    budgets = f"classic up to {args.steps} steps, speedrun up to {speedrun_budget(args)} steps with " \
        f"`{' '.join(settings_flags(args.settings))}`"
    if runs:
        report.add(f"## recipes: classic vs speedrun, target val loss {target}", budgets,
                   markdown_table(runs, columns), failure_notes(runs))
    summary = [time_summary(recipe, [r for r in runs if r["name"] == recipe]) for recipe in recipes]
    times = {s["name"]: s["time"] for s in summary}
    ratio = times["speedrun"] / times["classic"] if times.get("speedrun") is not None and times.get("classic") \
        else None
    pairs = [(a, b) for a, b in zip(runs[::2], runs[1::2]) if len(recipes) == 2]
    pair_ratios = [b["reached_time_s"] / a["reached_time_s"] for a, b in pairs
                   if a["ok"] and b["ok"] and a["reached"] and b["reached"]]
    if summary:
        columns = [("recipe", "name", ""), ("reached", "reached", ""), ("median time to target (s)", "time", ".1f"),
                   ("times (s)", "times", ""), ("median step", "step", ".0f"), ("median tokens", "tokens", ",.0f"),
                   ("mean best val loss", "best", ".4f")]
        ratio_text = f"{ratio:.3f}" if ratio is not None else "n/a (needs both recipes to reach the target)"
        pair_text = " ".join(f"{x:.3f}" for x in pair_ratios) or "n/a"
        report.add("## recipes: median over seeds (a run that missed the target counts as slowest)",
                   markdown_table(summary, columns),
                   f"speedrun / classic median time to target: {ratio_text}\n\n"
                   f"speedrun / classic per seed (runs back to back): {pair_text}")
    if args.ablate:
        ablations_suite(bench, args, report, [r for r in runs if r["name"] == "speedrun"])


def ablation_configs(args):
    """(name, flags, shown, steps) of every ablation --only keeps: a recipe piece switched off (shown: its flags),
    or a speedrun setting put back to the preset's (shown: the changed settings and the step budget)."""
    speedrun = settings_flags(args.settings)
    out = [(name, speedrun + flags, " ".join(flags), speedrun_budget(args))
           for name, flags in ABLATIONS.items() if name in args.only]
    for name, changed in SETTING_ABLATIONS.items():
        if name in args.only:
            steps = speedrun_budget(args, changed)
            shown = " ".join(f"--{k} {v}" for k, v in changed.items()) + f" --max_iters {steps}"
            out.append((name, settings_flags({**args.settings, **changed}), shown, steps))
    return out


def ablations_suite(bench, args, report, full):
    """Every ablation on every seed; one row each with the median time to target against the full speedrun's."""
    configs = ablation_configs(args)
    results = {name: [] for name, *_ in configs}
    for seed in args.seeds:
        for name, flags, _, steps in configs:
            results[name].append(run_config(bench, f"ablate_{name}", flags, seed, steps, "speedrun",
                                            label=f"speedrun ablation {name} seed {seed}"))
    base = time_summary("speedrun (full)", full, flags="") if full else None
    rows = [time_summary(name, results[name], flags=shown) for name, _, shown, _ in configs]
    for r in rows:
        if base and base["time"] is not None and r["time"] is not None:
            r["delta_time"] = r["time"] - base["time"]
            r["time_ratio"] = r["time"] / base["time"]
        if base and base["best"] is not None and r["best"] is not None:
            r["delta_best"] = r["best"] - base["best"]
    columns = [("ablation", "name", ""), ("flags", "flags", ""), ("reached", "reached", ""),
               ("median time (s)", "time", ".1f"), ("times (s)", "times", ""), ("median step", "step", ".0f"),
               ("mean best val loss", "best", ".4f"), ("time vs full", "time_ratio", ".2f"),
               ("delta best val loss", "delta_best", "+.4f")]
    seeds = " ".join(map(str, args.seeds))
    every = [r for runs in results.values() for r in runs]
    report.add(f"## recipes: speedrun ablations, seeds {seeds} (one piece off at a time; medians vs the full "
               "speedrun's; a run that missed the target counts as slowest)",
               markdown_table(([base] if base else []) + rows, columns), failure_notes(every))


def recipes_plan(args):
    recipes = [r for r in RECIPES if r in args.only]
    budget = {"classic": args.steps, "speedrun": speedrun_budget(args)}
    runs = len(recipes) * len(args.seeds)
    steps = sum(budget[r] for r in recipes) * len(args.seeds)
    if args.ablate:
        configs = ablation_configs(args)
        runs += len(configs) * len(args.seeds)
        steps += sum(s for *_, s in configs) * len(args.seeds)
    return runs, steps


SUITES = {"features": (features_suite, features_plan), "optimizers": (optimizers_suite, optimizers_plan),
          "recipes": (recipes_suite, recipes_plan)}


# --- report

class Report:
    """Markdown sections: each is printed when added, and the whole report is rewritten to `path` (and the runs
    to the .json beside it), so an interrupted benchmark keeps what it measured."""

    def __init__(self, path, header, bench):
        self.path, self.sections, self.bench = path, [], bench
        try:
            self.write()  # an --out that cannot be written stops the benchmark before its first run
        except OSError as e:
            raise UsageError(f"--out {path}: cannot write it ({e.strerror or e}); give a file in a folder you can "
                             "write") from None
        self.add(*header)

    def add(self, *parts):
        text = "\n\n".join(p for p in parts if p)
        print("\n" + text + "\n", flush=True)
        self.sections.append(text)
        self.write()

    def write(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        markdown = "\n\n".join(self.sections) + "\n"
        runs = json.dumps(self.bench.results, indent=1)
        for path, content in ((self.path, markdown), (os.path.splitext(self.path)[0] + ".json", runs)):
            train_gpt.atomic_write(path, lambda tmp, content=content: Path(tmp).write_text(content, encoding="utf-8"))


# --- command line

def build_parser():
    parser = train_gpt.OneLineParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--suite", required=True, choices=list(SUITES), help="which suite to run")
    parser.add_argument("--preset", default="shakespeare_char", choices=list(TRACKS),
                        help="the CPU track's preset every run starts from (default shakespeare_char)")
    parser.add_argument("--data", default=None, help="directory with train_*.bin and val_*.bin (default: the "
                        "track's, e.g. data/tinyshakespeare_char in the repository)")
    parser.add_argument("--steps", type=int, default=2000,
                        help="--max_iters of every run (recipes: the most steps to reach the target); default 2000")
    parser.add_argument("--speedrun_steps", type=int, default=None,
                        help="recipes: the speedrun's --max_iters (default: its settings' max_iters)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (default: 1337 for features, 1338 for optimizers, 1337 1338 1339 for recipes)")
    parser.add_argument("--sweep_steps", type=int, default=None,
                        help="optimizers: steps of each sweep run (default: --steps)")
    parser.add_argument("--sweep_seed", type=int, default=1337, help="optimizers: the sweep's seed; default 1337")
    parser.add_argument("--eval_interval", type=int, default=None,
                        help="default 250 (recipes: 50; the speedrun takes its settings')")
    parser.add_argument("--target", type=float, default=None,
                        help="recipes: --target_val_loss of every run (default: the track's, in "
                             "records/<preset>/README.md; 1.88, nanoGPT's figure, for shakespeare_char)")
    parser.add_argument("--ablate", action="store_true",
                        help="recipes: also run speedrun with each of its pieces off, one at a time, every seed")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help="run only these configs (features: config names; optimizers: optimizer names; recipes: "
                             "classic, speedrun and ablation names)")
    parser.add_argument("--extra", default="", help='flags appended to every run, e.g. "--n_layer 1 --n_embd 32"')
    parser.add_argument("--out", default=None, help="markdown file for the tables (default <log_dir>/results.md)")
    parser.add_argument("--log_dir", default=None, help="run logs (default logs/bench_<suite>_<timestamp>)")
    return parser


def resolve_args(parser, argv):
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    defaults = SUITE_DEFAULTS[args.suite]
    args.seeds = args.seeds or defaults["seeds"]
    args.eval_interval = defaults["eval_interval"] if args.eval_interval is None else args.eval_interval
    args.sweep_steps = args.steps if args.sweep_steps is None else args.sweep_steps
    if args.steps <= 0 or args.sweep_steps <= 0 or args.eval_interval < 0:
        parser.error("--steps and --sweep_steps must be positive and --eval_interval >= 0")
    check_numbers(args)
    args.extra_flags = extra_flags(args.extra)
    if args.ablate and args.suite != "recipes":
        parser.error("--ablate applies to --suite recipes")
    valid = suite_names(args.suite)
    unknown = [n for n in args.only or [] if n not in valid]
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: not in suite {args.suite}; choose from {' '.join(valid)}")
    args.only = set(args.only or valid)
    data, target = track_rules(args.preset)
    args.data = os.path.abspath(args.data) if args.data else str(data)
    args.target = target if args.target is None else args.target
    args.settings = speedrun_settings(args.preset)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    args.log_dir = os.path.abspath(args.log_dir or ROOT / "logs" / f"bench_{args.suite}_{stamp}")
    args.out = os.path.abspath(args.out) if args.out else os.path.join(args.log_dir, "results.md")
    if os.path.exists(args.log_dir) and not os.path.isdir(args.log_dir):
        raise UsageError(f"--log_dir {args.log_dir} is a file, not a folder: give a folder for the run logs")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder: give a file name, e.g. {os.path.join(args.out, 'results.md')}")
    for flag, path in (("--log_dir", args.log_dir), ("--out", args.out)):
        parent = next(p for p in Path(path).parents if p.exists())
        if not parent.is_dir():
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    return args


def check_numbers(args):
    """The seeds, --speedrun_steps and --target as train_gpt.py would take them; a UsageError names the flag."""
    for flag, seeds in (("--seeds", args.seeds), ("--sweep_seed", [args.sweep_seed])):
        bad = [s for s in seeds if not 0 <= s < 2 ** 32]
        if bad:
            raise UsageError(f"{flag} {bad[0]}: give seeds from 0 to {2 ** 32 - 1}")
    if args.speedrun_steps is not None and args.speedrun_steps <= 0:
        raise UsageError(f"--speedrun_steps {args.speedrun_steps}: give a positive number of steps")
    if args.target is not None and not (math.isfinite(args.target) and args.target >= 0):
        raise UsageError(f"--target {args.target}: give a finite val loss >= 0 (0: no target)")


def extra_flags(extra):
    """--extra split into train_gpt.py flags; one it would refuse is a UsageError naming it."""
    try:
        flags = shlex.split(extra)
    except ValueError as e:
        raise UsageError(f"--extra {extra!r}: {e}; give flags as on a command line, e.g. --extra \"--n_layer 1\"") \
            from None
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(refusal):
            train_gpt.build_parser().parse_args(flags)
    except SystemExit:
        reason = refusal.getvalue().strip().removeprefix("error: ") or "not flags of a run"
        raise UsageError(f"--extra {extra!r}: {reason}") from None
    return flags


def check_data(args):
    """The --data folder holds train and val shards with a meta.json, as train_gpt.py checks them."""
    train, val = os.path.join(args.data, "train_*.bin"), os.path.join(args.data, "val_*.bin")
    if not (glob.glob(train) and glob.glob(val)):
        raise UsageError(f"no train_*.bin and val_*.bin in {args.data}; {TRACKS[args.preset]}")
    try:
        meta = train_gpt.load_meta(train)
        for pattern, what in ((train, "training"), (val, "validation")):
            train_gpt.check_shards(train_gpt.find_shards(pattern, what), meta["vocab_size"], 1)
    except UsageError as e:
        raise UsageError(f"--data {args.data}: {e}") from None


def header(args):
    shown = " ".join(shlex.quote(a) for a in args.argv)
    lines = [f"# benchmark: {args.suite}", machine_line(),
             f"command: `python bench/benchmark.py {shown}`",
             f"steps {args.steps}, seeds {' '.join(map(str, args.seeds))}, eval_interval {args.eval_interval}, "
             f"data {args.data}, logs {args.log_dir}" + (f", extra `{args.extra}`" if args.extra else "")]
    recipes = ["classic"] if args.suite != "recipes" else ["classic", "speedrun"]
    steps = [args.steps] + ([args.sweep_steps] if args.suite == "optimizers" else [])
    notes = {(recipe, n): schedule_note(args.preset, recipe, n) for recipe in recipes for n in steps}
    scaled = [f"{recipe} at {n} steps: {note}" for (recipe, n), note in notes.items() if note]
    if scaled:
        lines.append("note: train_gpt.py shortened the schedule to fit: " + "; ".join(scaled))
    return ["\n".join(lines[:1] + [""] + [f"- {line}" for line in lines[1:]])]


def main(argv=None):
    parser = build_parser()
    args = resolve_args(parser, argv)
    check_data(args)
    suite, plan = SUITES[args.suite]
    bench = Bench(args, Progress(*plan(args)))
    report = Report(args.out, header(args), bench)
    try:
        suite(bench, args, report)
    except KeyboardInterrupt:
        report.add(f"**interrupted** after {len(bench.results)} runs: the tables above are all the benchmark made")
        print(f"interrupted after {len(bench.results)} runs; the tables so far are in {args.out}", file=sys.stderr)
        return 130
    failed = [r for r in bench.results if not r["ok"]]
    print(f"{len(bench.results)} runs, {len(failed)} failed, in {fmt_duration(time.time() - bench.progress.start)}; "
          f"tables in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run_tool(main)
