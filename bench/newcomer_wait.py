#!/usr/bin/env python3
"""How long a newcomer waits: `./run.sh` on the CPU from a fresh clone, wall-clock against the train time it logs.

    python bench/newcomer_wait.py [--runs 2] [--commit REV] [--keep DIR]

Clones this checkout's HEAD (or --commit) into a temporary folder, then runs `./run.sh` there --runs times with one
compile cache (TORCHINDUCTOR_CACHE_DIR, and TMPDIR for the precompiled header) that starts empty: the first run is
the cold-cache case, the later ones warm.
Each output line is stamped with the seconds since the command started, so the table says where the wait went:
start-up until the first line, the warm-up (compilation), validation and training. The first run also prepares the
data, as a newcomer's would; that time is shown on its own.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.cli import OneLineParser, UsageError, run_tool, writable_folder  # noqa: E402

OUTCOME = re.compile(r"target val_loss \S+ reached at step:(\d+) train_time:(\d+)ms")
WARM_UP = re.compile(r"^warm-up: .* ([\d.]+) s, untimed")


def stamped_run(command, cwd, env):
    """Runs command, returning [(seconds since start, line)] of its output and the total seconds."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in proc.stdout]
    if proc.wait() != 0:
        sys.exit("error: ./run.sh failed:\n" + "\n".join(line for _, line in lines[-20:]))
    return lines, time.perf_counter() - started


def phases(lines, total):
    """Seconds spent preparing data, starting (imports and checks, until the log's first line), warming up, in
    the loop's untimed part (validation and logging: the loop's time less the train time) and after the loop."""
    first = next((t for t, line in lines if line.startswith("log: ")), None)
    outcome_at, outcome = next(((t, OUTCOME.search(line)) for t, line in lines if OUTCOME.search(line)), (0, None))
    if first is None or outcome is None:
        raise UsageError("./run.sh printed no 'log: ' line or no 'target val_loss ... reached' line: a --commit "
                         "older than this script's log format, or a run that missed its target; try a newer --commit")
    data = next((t for t, line in lines if line.startswith("meta:")), 0.0)
    train = int(outcome.group(2)) / 1000
    # commits before the warm-up line was logged: the warm-up and the loop's untimed part are one figure
    warm_end, warm = next(((t, float(m.group(1))) for t, line in lines if (m := WARM_UP.match(line))),
                          (first, float("nan")))
    return dict(wall=total, train=train, step=int(outcome.group(1)), start=first - data, data=data, warm_up=warm,
                validation=outcome_at - warm_end - train)


def measure(folder, commit, runs):
    """Clones commit into folder/clone and runs ./run.sh there `runs` times; returns (rows, short hash)."""
    clone = os.path.join(folder, "clone")
    subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    cache, temp = os.path.join(folder, "inductor_cache"), os.path.join(folder, "tmp")
    os.makedirs(temp)
    # inductor keeps its precompiled C++ header in the temporary folder, outside TORCHINDUCTOR_CACHE_DIR
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TMPDIR=temp, PYTHONUNBUFFERED="1")
    rows = []
    for run in range(runs):
        lines, total = stamped_run(["./run.sh"], clone, env)
        rows.append(dict(phases(lines, total), cache="cold" if run == 0 else "warm"))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
    return rows, head


def revision(commit):
    """The full hash of --commit in this checkout; a UsageError when it names no commit."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], cwd=ROOT,
                           capture_output=True, text=True)
    if commit.startswith("-") or found.returncode:
        raise UsageError(f"--commit {commit}: no such commit in {ROOT}; give a branch, tag or hash (git log --oneline)")
    return found.stdout.strip()


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of ./run.sh: the first cold, the rest warm")
    parser.add_argument("--commit", default="HEAD", help="the revision to clone (default HEAD)")
    parser.add_argument("--keep", help="clone into this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    commit = revision(args.commit)
    if args.keep and os.path.exists(os.path.join(args.keep, "clone")):
        raise UsageError(f"--keep {args.keep}: {os.path.join(args.keep, 'clone')} exists; give another --keep folder")
    folder = writable_folder("keep", args.keep) if args.keep else tempfile.mkdtemp(prefix="newcomer_")
    try:
        rows, head = measure(folder, commit, args.runs)
    finally:
        if not args.keep:
            shutil.rmtree(folder)
    print(f"./run.sh from a fresh clone of {head.strip()}, {os.cpu_count()} cores, one compile cache for all runs")
    print("| compile cache | wall-clock | train time | wall / train | start-up | data | warm-up | validation and "
          "logging | target step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cache']} | {r['wall']:.1f} s | {r['train']:.1f} s | {r['wall'] / r['train']:.2f}x "
              f"| {r['start']:.1f} s | {r['data']:.1f} s | {r['warm_up']:.1f} s | {r['validation']:.1f} s "
              f"| {r['step']} |")
    return 0


if __name__ == "__main__":
    run_tool(main)
