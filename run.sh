#!/usr/bin/env bash
# ./run.sh [flags]: with N CUDA GPUs, the gpt2_124m preset on FineWeb under torchrun, after fetching the train shards
# its max_iters steps read (data/cached_fineweb10B.py skips shards already present); the process count is the largest
# one <= N that can share the global batch equally (train_gpt.launch_plan; one line says so when that is fewer than
# N). With no GPU, the shakespeare_char preset on the CPU (preparing the data if missing). Flags pass through to
# train_gpt.py; --preset and --max_iters also steer the fetch, the batch flags the process count.
# `./run.sh --check` checks instead of training (train_gpt.py --check, under torchrun with GPUs) and fetches or
# prepares no data: it says what is missing.
# Testing without GPUs: RUN_SH_GPUS=N stands in for the GPU count, and RUN_SH_DRY_RUN=1 prints each command instead
# of running it, e.g. `RUN_SH_GPUS=6 RUN_SH_DRY_RUN=1 ./run.sh --max_iters 500`.
set -euo pipefail
cd "$(dirname "$0")"
case "${RUN_SH_DRY_RUN:-0}" in
    0|1) ;;
    *) echo "error: RUN_SH_DRY_RUN=$RUN_SH_DRY_RUN: set 1 to print the commands instead of running them, or 0" >&2
       exit 2 ;;
esac
dry_run() { [ "${RUN_SH_DRY_RUN:-0}" = 1 ] && { line=$(printf '%q ' "$@"); echo "${line% }"; }; }
run() { dry_run "$@" || "$@"; }  # runs a command, or prints it under RUN_SH_DRY_RUN=1
launch() { dry_run "$@" && exit 0; exec "$@"; }  # execs a command, or prints it under RUN_SH_DRY_RUN=1
CHECK=no
for arg in "$@"; do [ "$arg" = --check ] && CHECK=yes; done
if [ -n "${RUN_SH_GPUS:-}" ]; then
    NGPU=$RUN_SH_GPUS
elif command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1; then
    NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
else  # no GPU driver: no need to spend seconds importing torch to count none
    NGPU=0
fi
if ! [[ "$NGPU" =~ ^[0-9]{1,6}$ ]]; then
    echo "error: RUN_SH_GPUS=$NGPU is not a GPU count: unset it, or set a whole number" >&2
    exit 2
fi
if [ "$NGPU" -gt 0 ]; then
    # "NPROC PRESET MAX_ITERS": the most processes <= NGPU that can share the batch, and what the fetch needs
    PLAN=$(python -c 'import sys, train_gpt
train_gpt.run_cli(lambda: print(*train_gpt.launch_plan(int(sys.argv[1]), sys.argv[2:])))' \
        "$NGPU" --preset gpt2_124m "$@")
    read -r NPROC PRESET MAX_ITERS <<< "$PLAN"
    [ "$CHECK" = yes ] || run python data/cached_fineweb10B.py --preset "$PRESET" --max_iters "$MAX_ITERS"
    launch torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py --preset gpt2_124m "$@"
fi
if [ "$CHECK" = no ] && [ ! -f data/shakespeare_char/meta.json ]; then
    run python data/shakespeare.py --mode char --out_dir data/shakespeare_char
fi
launch python train_gpt.py --preset shakespeare_char --device cpu "$@"
