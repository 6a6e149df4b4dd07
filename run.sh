#!/usr/bin/env bash
# ./run.sh [flags]: with N CUDA GPUs, the gpt2_124m preset on FineWeb under torchrun (fetching missing shards);
# with none, the shakespeare_char preset on the CPU (preparing the data if missing). Flags pass through.
set -euo pipefail
cd "$(dirname "$0")"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
    if ! ls data/fineweb10B/fineweb_val_*.bin >/dev/null 2>&1; then
        python data/cached_fineweb10B.py 8
    fi
    exec torchrun --standalone --nproc_per_node="$NGPU" train_gpt.py --preset gpt2_124m "$@"
fi
if [ ! -f data/shakespeare_char/meta.json ]; then
    python data/shakespeare.py --mode char --out_dir data/shakespeare_char
fi
exec python train_gpt.py --preset shakespeare_char --device cpu "$@"
