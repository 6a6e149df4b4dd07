"""
data/cached_fineweb10B.py: downloads GPT-2-tokenized FineWeb (10B-token sample) shards for train_gpt.py.

Usage:
    python data/cached_fineweb10B.py        # val shard + the first 8 train shards (800M tokens) -> data/fineweb10B/
    python data/cached_fineweb10B.py 103    # all 103 train shards (~10B tokens, ~20 GB)
    python data/cached_fineweb10B.py 1 --out_dir /scratch/fineweb10B

Fetches fineweb_val_000000.bin and fineweb_train_000001.bin ... fineweb_train_<N>.bin from the Hugging Face dataset
repo kjj0/fineweb10B-gpt2 (llm.c shard format, GPT-2 token ids; ~100M tokens and ~200 MB a shard; the val shard is
the 100M tokens train_gpt.py's gpt2 presets evaluate on). The default N = 8 gives 800M training tokens, more than a
GPT-2 (124M) speedrun reads, at a fraction of the full download. Files already present with a valid shard header
and size are skipped, so an interrupted download resumes where it stopped. Writes meta.json
({"tokenizer": "gpt2", "vocab_size": 50257}) beside the shards. The default folder is data/fineweb10B/ beside this
script, whatever the current directory. Needs network access to huggingface.co (HF_ENDPOINT and HF_TOKEN are honoured
by huggingface_hub).
"""
import os
import sys

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DATA_DIR)
# train_gpt.py (shard format, tokenizer) lives in the repo root
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import json  # noqa: E402
import time  # noqa: E402

from train_gpt import OneLineParser, UsageError, run_cli, read_shard  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"
MAX_TRAIN_SHARDS = 103
DEFAULT_TRAIN_SHARDS = 8
DEFAULT_OUT_DIR = os.path.join(DATA_DIR, "fineweb10B")


def shard_names(n):
    """The val shard, then the first n training shards (numbered from 1)."""
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n + 1)]


def hf_download(name, out_dir):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # its retry warnings would bury the one-line error below
    hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=out_dir)


def is_complete(path):
    """True when path is a shard whose header and size check out (a truncated file is fetched again)."""
    if not os.path.isfile(path):
        return False
    try:
        read_shard(path)
    except UsageError:
        return False
    return True


def fetch(names, out_dir, download=hf_download, log=print):
    """Downloads the names missing from out_dir with download(name, out_dir); returns (fetched, skipped) names."""
    os.makedirs(out_dir, exist_ok=True)
    fetched, skipped = [], []
    for i, name in enumerate(names, 1):
        path = os.path.join(out_dir, name)
        if is_complete(path):
            skipped.append(name)
            continue
        log(f"[{i}/{len(names)}] downloading {name}")
        try:
            download(name, out_dir)
        except Exception as e:  # network, authentication and missing-file errors all end the run the same way
            detail = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
            raise UsageError(f"could not download {name} from huggingface.co/datasets/{REPO_ID} "
                             f"({type(e).__name__}: {detail}); check the network connection") from None
        if not is_complete(path):
            raise UsageError(f"{path}: the downloaded file is not a complete shard; delete it and run again")
        fetched.append(name)
    return fetched, skipped


def write_meta(out_dir):
    path = os.path.join(out_dir, "meta.json")
    with open(path, "w") as f:
        json.dump({"tokenizer": "gpt2", "vocab_size": 50257, "source": f"huggingface.co/datasets/{REPO_ID}"}, f)
        f.write("\n")
    return path


def build_parser():
    parser = OneLineParser(description=f"Download GPT-2-tokenized FineWeb10B shards from {REPO_ID}.")
    parser.add_argument("n", nargs="?", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"training shards to fetch, ~100M tokens each (default {DEFAULT_TRAIN_SHARDS}, "
                             f"at most {MAX_TRAIN_SHARDS})")
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR, metavar="DIR",
                        help="download folder (default: data/fineweb10B beside this script)")
    return parser


def main(argv=None, download=hf_download):
    args = build_parser().parse_args(argv)
    if not 0 <= args.n <= MAX_TRAIN_SHARDS:
        raise UsageError(f"N = {args.n}: the repo holds training shards 1 to {MAX_TRAIN_SHARDS}")
    t0 = time.time()
    fetched, skipped = fetch(shard_names(args.n), args.out_dir, download)
    meta = write_meta(args.out_dir)
    print(f"{len(fetched)} shard(s) downloaded, {len(skipped)} already present, in {args.out_dir} "
          f"({time.time() - t0:.0f}s); meta: {meta}")


if __name__ == "__main__":
    run_cli(main)
