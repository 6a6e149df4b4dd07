#!/usr/bin/env bash
# ./run.sh [flags]: with N CUDA GPUs, the gpt2_124m preset on FineWeb under torchrun, after fetching the train shards
# its max_iters steps read (data/cached_fineweb10B.py skips shards already present); the process count is the largest
# one <= N that divides the preset's grad_accum_steps, so every process gets the same share of the global batch
# (one line says so when that is fewer than N). With no GPU, the shakespeare_char preset on the CPU (preparing the
# data if missing). Flags pass through to train_gpt.py; --preset, --max_iters and --grad_accum_steps also steer the
# fetch and the process count.
# Testing without GPUs: RUN_SH_GPUS=N stands in for the GPU count, and RUN_SH_DRY_RUN=1 prints each command instead
# of running it, e.g. `RUN_SH_GPUS=6 RUN_SH_DRY_RUN=1 ./run.sh --max_iters 500`.
set -euo pipefail
cd "$(dirname "$0")"
dry_run() { [ "${RUN_SH_DRY_RUN:-0}" = 1 ] && { line=$(printf '%q ' "$@"); echo "${line% }"; }; }
run() { dry_run "$@" || "$@"; }  # runs a command, or prints it under RUN_SH_DRY_RUN=1
launch() { dry_run "$@" && exit 0; exec "$@"; }  # execs a command, or prints it under RUN_SH_DRY_RUN=1
NGPU=${RUN_SH_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
if ! [[ "$NGPU" =~ ^[0-9]+$ ]]; then
    echo "error: RUN_SH_GPUS=$NGPU is not a GPU count: unset it, or set a whole number" >&2
    exit 2
fi
if [ "$NGPU" -gt 0 ]; then
    # prints "PRESET MAX_ITERS NPROC" for the preset and the passed-through flags
    PLAN=$(python - "$NGPU" "$@" <<'PY'
import argparse
import sys

from train_gpt import PRESETS

parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
parser.add_argument("--preset", default="gpt2_124m")
for name in ("max_iters", "batch_size"):
    parser.add_argument(f"--{name}")
parser.add_argument("--grad_accum_steps", "--gradient_accumulation_steps")
ngpu, flags = int(sys.argv[1]), parser.parse_known_args(sys.argv[2:])[0]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if flags.preset not in PRESETS:
    fail(f"--preset {flags.preset}: no such preset; use one of {', '.join(PRESETS)}")
values = {}
for name in ("max_iters", "batch_size", "grad_accum_steps"):
    text = getattr(flags, name) or str(PRESETS[flags.preset][name])
    if not text.isdigit() or int(text) < 1:
        fail(f"--{name} {text}: expected a positive integer")
    values[name] = int(text)
accum = values["grad_accum_steps"]
nproc = max(p for p in range(1, ngpu + 1) if accum % p == 0)
if nproc < ngpu:
    print(f"run.sh: using {nproc} of {ngpu} GPUs, the most that split {flags.preset}'s {accum} micro-batches of "
          f"{values['batch_size']} sequences per step evenly", file=sys.stderr)
print(flags.preset, values["max_iters"], nproc)
PY
)
    read -r PRESET MAX_ITERS NPROC <<< "$PLAN"
    run python data/cached_fineweb10B.py --preset "$PRESET" --max_iters "$MAX_ITERS"
    launch torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py --preset gpt2_124m "$@"
fi
if [ ! -f data/shakespeare_char/meta.json ]; then
    run python data/shakespeare.py --mode char --out_dir data/shakespeare_char
fi
launch python train_gpt.py --preset shakespeare_char --device cpu "$@"
