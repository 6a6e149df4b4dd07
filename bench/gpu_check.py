#!/usr/bin/env python3
"""The prepared measurement of a lent GPU: one command, a fixed time budget, a report written as it goes.

    python bench/gpu_check.py                       # on a CUDA machine: writes bench/results/gpu/<date>_<gpu>/
    python bench/gpu_check.py --out DIR             # the report elsewhere (on the lent machine: $OUT)
    python bench/gpu_check.py --device cpu --out DIR   # the same sequence with tiny shapes, as a test runs it

Parts, in order of value, each in its own subprocess with its own time limit (and never past the whole budget):
  machine   nvidia-smi, versions of python/torch/CUDA/Triton, the GPU's name and memory
  tests     the suite's CUDA tests (pytest -m cuda): on a GPU they must run, a skip counts as a failure
  check     train_gpt.py --preset gpt2_124m --check on the check's data: versions, batch split, memory, fallbacks
  compiled  gpt2_124m, bf16, torch.compile, the micro-batch the memory fit picks: compile time (first step), step
            time, tokens/s, MFU, peak memory against estimate_train_memory; then a torch.profiler table of one step
  eager     the same without torch.compile
  mtp2      compiled, --mtp_steps 2
  kv4       compiled, 4 key/value heads (grouped-query attention)
The data is random GPT-2 token ids written at the start (no tokenizer, no download): right for throughput and
memory, meaningless for loss. report.md and report.json are rewritten after every part, so a timeout loses only
the part that was running.
"""
import argparse
import datetime
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.cli import OneLineParser, UsageError, positive_int, run_tool, writable_folder  # noqa: E402

# (name, seconds at most, train_gpt.py flags for the train parts): the budget cuts the later parts first
PARTS = [("machine", 30, None), ("tests", 120, None), ("check", 60, None), ("compiled", 150, []),
         ("eager", 90, ["--compile", "False"]), ("mtp2", 120, ["--mtp_steps", "2"]), ("kv4", 120, ["--n_kv_head", "4"])]
# The CPU rehearsal: gpt2_124m's vocabulary and code path at a size two cores train in seconds.
TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--block_size", "64", "--batch_size", "4",
        "--grad_accum_steps", "2", "--precision", "fp32"]
GIB = 2 ** 30
MAX_STEPS = 100  # timed steps per train part: the data for them is made up front, in memory


def train_flags(device, data, extra, eager=False):
    """gpt2_124m on the check's random shards: the preset as a run resolves it, plus the part's own flags."""
    flags = ["--preset", "gpt2_124m", "--device", device, "--input_bin", os.path.join(data, "train_*.bin"),
             "--input_val_bin", os.path.join(data, "val_*.bin"), "--max_data_passes", "0",
             "--timing_warmup_steps", "0", "--run_id", "gpu_check", "--log_dir", os.path.join(data, "logs")]
    return flags + (TINY + ["--compile", "True"] if device == "cpu" else []) + extra + \
        (["--compile", "False"] if eager else [])


def make_data(directory, tokens):
    """Random GPT-2 token ids as one train and one val shard, with the meta.json the trainer reads."""
    import numpy as np
    import train_gpt
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    train_gpt.write_shard(os.path.join(directory, "train_000000.bin"),
                          rng.integers(0, train_gpt.GPT2_VOCAB_SIZE, tokens))
    train_gpt.write_shard(os.path.join(directory, "val_000000.bin"),
                          rng.integers(0, train_gpt.GPT2_VOCAB_SIZE, 1 << 17))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"tokenizer": "gpt2"}, f)


# --- the parts, each run in a child process: `gpu_check.py --part NAME`, which prints one JSON line

def part_machine(args):
    import torch
    import train_gpt
    out = {"versions": train_gpt.versions(), "python": sys.executable}
    if torch.cuda.is_available():
        props, (major, minor) = torch.cuda.get_device_properties(0), torch.cuda.get_device_capability(0)
        out.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}",
                   memory_gib=round(props.total_memory / GIB, 1), gpus=torch.cuda.device_count(),
                   peak_bf16_tflops=(train_gpt.peak_flops(torch.device("cuda", 0)) or 0) / 1e12)
        out["nvidia_smi"] = train_gpt.hardware_description(torch.device("cuda", 0))
    else:
        out["cpu"] = train_gpt.hardware_description(torch.device("cpu"))
    return out


def part_train(args):
    """Steps of the real Trainer: the first (compilation included), warm ones, timed ones, one profiled."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    import train_gpt
    cfg = train_gpt.resolve_config(train_flags(args.device, args.data, args.flags, args.eager))
    trainer = train_gpt.Trainer(cfg, log=lambda line: None)
    trainer.setup()
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train_step(0)
    trainer.synchronize()
    first_step_s = time.perf_counter() - started
    for step in range(1, 3):
        trainer.train_step(step)
    trainer.synchronize()
    started = time.perf_counter()
    for step in range(3, 3 + args.steps):
        loss, _, _ = trainer.train_step(step)
    trainer.synchronize()
    step_s = (time.perf_counter() - started) / args.steps
    tok_s = cfg.tokens_per_step / step_s
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mfu = 100 * trainer.flops_per_token * tok_s / trainer.peak if trainer.peak else None
    out = dict(flags=" ".join(args.flags), precision=cfg.precision, compile=cfg.compile, notes=list(cfg.notes),
               batch=train_gpt.describe_batch(cfg), model=train_gpt.describe_model(trainer.gcfg),
               first_step_s=round(first_step_s, 2), step_ms=round(1000 * step_s, 1), tokens_per_s=round(tok_s),
               mfu_percent=None if mfu is None else round(mfu, 1), loss=round(loss.item(), 4),
               peak_memory_gib=round(peak / GIB, 2), peak_memory_kind="max allocated" if cuda else "max RSS",
               estimate_gib=round(trainer.memory_needed / GIB, 2))
    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            trainer.train_step(3 + args.steps)
            trainer.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        out["profile"] = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)
    return out


# --- the parent: runs the parts in order within the budget, rewriting the report after each

def run_part(name, limit, flags, args, data):
    """Runs one part in a child process; returns its record (status ok / failed / timeout, seconds, result)."""
    if name == "tests":
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider",
                   os.path.join(ROOT, "tests")]
    elif name == "check":
        command = [sys.executable, os.path.join(ROOT, "train_gpt.py"), "--check",
                   *train_flags(args.device, data, [])]
    else:
        command = [sys.executable, os.path.abspath(__file__), "--part", "machine" if name == "machine" else "train",
                   "--device", args.device, "--data", data, "--steps", str(args.steps)]
        if name == "compiled":
            command.append("--profile")
        if args.eager:
            command.append("--eager")
        if flags:
            command += ["--flags", *flags]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return dict(name=name, status="timeout", seconds=round(time.perf_counter() - started, 1),
                    output=output[-3000:] + f"\n(stopped at its limit of {limit:.0f} s)")
    record = dict(name=name, seconds=round(time.perf_counter() - started, 1), returncode=proc.returncode,
                  status="ok" if proc.returncode == 0 else "failed")
    output = proc.stdout + proc.stderr
    if name == "tests":
        # pytest's summary: the last line of its stdout (stderr may carry warnings from the tests' processes)
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        summary = re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", last)
        record["result"] = counts = {kind: int(n) for n, kind in summary}
        if counts.get("skipped") and args.device == "cuda":  # on a GPU every CUDA test must run
            record["status"] = "failed"
        record["output"] = output[-4000:]
    elif name == "check":
        record["output"] = output[-4000:]
    elif proc.returncode == 0:
        record["result"] = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        record["output"] = output[-4000:]
    return record


def write_report(out_dir, header, records):
    import train_gpt
    report = json.dumps(dict(header, parts=records), indent=1)
    train_gpt.atomic_write(os.path.join(out_dir, "report.json"), lambda tmp: Path(tmp).write_text(report))
    lines = [f"# GPU check, {header['date']}", "", f"Command: `{header['command']}`", "",
             f"Device: {header['device']}; budget {header['budget_s']} s; timed steps per train part "
             f"{header['steps']}. The data is random GPT-2 token ids (right for throughput and memory, meaningless "
             "for loss).", ""]
    trains = [r for r in records if "result" in r and "tokens_per_s" in r["result"]]
    if trains:
        lines += ["| part | flags | first step (compile) | step | tokens/s | MFU | peak memory | estimate |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in trains:
            x = r["result"]
            mfu = "n/a" if x["mfu_percent"] is None else f"{x['mfu_percent']}%"
            lines.append(f"| {r['name']} | `{x['flags'] or '(preset)'}` | {x['first_step_s']} s | {x['step_ms']} ms "
                         f"| {x['tokens_per_s']:,} | {mfu} | {x['peak_memory_gib']} GiB ({x['peak_memory_kind']}) "
                         f"| {x['estimate_gib']} GiB |")
        lines.append("")
    for r in records:
        lines += [f"## {r['name']}: {r['status']} ({r['seconds']} s)", ""]
        result = {k: v for k, v in r.get("result", {}).items() if k not in ("profile", "nvidia_smi", "cpu")}
        if result:
            lines += ["```", json.dumps(result, indent=1), "```", ""]
        for key in ("nvidia_smi", "cpu", "profile"):
            if r.get("result", {}).get(key):
                lines += ["```", r["result"][key].rstrip(), "```", ""]
        if r.get("output"):
            lines += ["```", r["output"].rstrip(), "```", ""]
    train_gpt.atomic_write(os.path.join(out_dir, "report.md"), lambda tmp: Path(tmp).write_text("\n".join(lines)))


def default_out_dir(device):
    name = "cpu"
    if device == "cuda":
        import torch
        name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-")
    return os.path.join(ROOT, "bench", "results", "gpu", f"{datetime.date.today():%Y-%m-%d}_{name}")


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: measure the GPU; cpu: the same sequence with tiny shapes (a rehearsal)")
    parser.add_argument("--out", help="the report's folder (default bench/results/gpu/<date>_<gpu>)")
    parser.add_argument("--budget_s", type=float, default=420, help="seconds for all parts together (default 420)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per train part (default 6)")
    parser.add_argument("--eager", action="store_true",
                        help="every train part without torch.compile (the CPU test's shortcut; compiling on the CPU "
                             "is tested elsewhere)")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in PARTS], help="run only these parts")
    parser.add_argument("--part", choices=["machine", "train"], help=argparse.SUPPRESS)  # a child's own part
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    positive_int("steps", args.steps, at_most=MAX_STEPS)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise UsageError(f"--budget_s {args.budget_s}: give a finite number of seconds above 0")
    if args.part:
        print(json.dumps((part_machine if args.part == "machine" else part_train)(args)))
        return 0
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("no CUDA GPU is visible; on a CPU run `python bench/gpu_check.py --device cpu --out DIR`")
    out_dir = writable_folder("out", args.out or default_out_dir(args.device))
    deadline = time.perf_counter() + args.budget_s
    command = "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = dict(date=f"{datetime.datetime.now():%Y-%m-%d %H:%M}", device=args.device, budget_s=args.budget_s,
                  steps=args.steps, eager=args.eager, command=command)
    records = []
    with tempfile.TemporaryDirectory() as data:
        # enough tokens for every step of the largest part: 3 warm + timed + 1 profiled, twice over
        sequences = 512 if args.device == "cuda" else 8
        make_data(data, 2 * (args.steps + 4) * sequences * (1024 if args.device == "cuda" else 64) + 4096)
        for name, limit, flags in PARTS:
            if args.only and name not in args.only:
                continue
            left = deadline - time.perf_counter()
            if left < 5:
                records.append(dict(name=name, status="not run", seconds=0, output="the budget was spent"))
            else:
                print(f"gpu_check: {name} (at most {min(limit, left):.0f} s)", flush=True)
                records.append(run_part(name, min(limit, left), flags, args, data))
                print(f"gpu_check: {name} {records[-1]['status']} in {records[-1]['seconds']} s", flush=True)
            write_report(out_dir, header, records)
    print(f"gpu_check: report in {os.path.join(out_dir, 'report.md')}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    run_tool(main)
