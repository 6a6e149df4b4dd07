"""
data/cached_fineweb10B.py: downloads GPT-2-tokenized FineWeb (10B-token sample) shards for train_gpt.py.

Usage:
    python data/cached_fineweb10B.py                    # val + the 27 train shards gpt2_124m's 5,000 steps read
    python data/cached_fineweb10B.py --max_iters 500    # val + the 3 train shards 500 steps of gpt2_124m read
    python data/cached_fineweb10B.py --preset bottlecap # the same for another preset of train_gpt.py
    python data/cached_fineweb10B.py 103                # an explicit count wins: all 103 train shards (~20 GB)
    python data/cached_fineweb10B.py 1 --out_dir /scratch/fineweb10B

Fetches fineweb_val_000000.bin and fineweb_train_000001.bin ... fineweb_train_<N>.bin from the Hugging Face dataset
repo kjj0/fineweb10B-gpt2 (llm.c shard format, GPT-2 token ids; 100M tokens and ~200 MB a shard; the val shard is
the 100M tokens train_gpt.py's gpt2 presets evaluate on). Without N, N is the number of train shards that
max_iters * tokens_per_step of the preset (train_gpt.PRESETS) reads in one pass, so the loader never wraps around.
Files already present with a valid shard header and size are skipped, so an interrupted download resumes with the
next shard; a truncated shard is deleted and fetched again. Writes meta.json
({"tokenizer": "gpt2", "vocab_size": 50257}) beside the shards once every shard is in place. The default folder is
data/fineweb10B/ beside this script, whatever the current directory. Needs network access to huggingface.co
(HF_ENDPOINT and HF_TOKEN are honoured by huggingface_hub); a failed download stops with one line saying how to
fetch the shard by hand, and leaves no partial file.
"""
import os
import sys

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DATA_DIR)
# train_gpt.py (shard format, presets) lives in the repo root
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import math  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

from train_gpt import PRESETS, OneLineParser, UsageError, read_shard, write_json  # noqa: E402
from bench.cli import run_tool, writable_folder  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"
MAX_TRAIN_SHARDS = 103
SHARD_TOKENS = 100_000_000  # tokens in each train shard
DEFAULT_PRESET = "gpt2_124m"
DEFAULT_OUT_DIR = os.path.join(DATA_DIR, "fineweb10B")


def shard_names(n):
    """The val shard, then the first n training shards (numbered from 1)."""
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n + 1)]


def tokens_per_step(preset):
    p = PRESETS[preset]
    return p["batch_size"] * p["block_size"] * p["grad_accum_steps"]


def shards_needed(preset, max_iters=None):
    """(train shards, tokens): the shards max_iters steps of preset read in one pass (may exceed MAX_TRAIN_SHARDS).
    The loader uses a shard in whole batches, so up to a global batch of sequences (plus one sequence and a few
    target tokens) of each shard goes unread; counting that keeps the last steps off a second pass."""
    p = PRESETS[preset]
    max_iters = p["max_iters"] if max_iters is None else max_iters
    tokens = max_iters * tokens_per_step(preset)
    usable = SHARD_TOKENS - (p["batch_size"] * p["grad_accum_steps"] + 1) * p["block_size"] - 4
    return math.ceil(tokens / usable), tokens


def hf_download(name, out_dir):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # its retry warnings would bury the one-line error below
    cache = os.path.join(out_dir, ".cache")
    had_cache = os.path.isdir(cache)
    try:
        hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=out_dir)
    except BaseException:
        # huggingface_hub deletes its own partial download; what is left is its bookkeeping under out_dir/.cache
        if had_cache:
            lock = os.path.join(cache, "huggingface", "download", f"{name}.lock")
            if os.path.exists(lock):
                os.remove(lock)
        else:
            shutil.rmtree(cache, ignore_errors=True)
        raise


def is_complete(path):
    """True when path is a shard whose header and size check out (a truncated file is fetched again)."""
    if not os.path.isfile(path):
        return False
    try:
        read_shard(path)
    except UsageError:
        return False
    return True


def by_hand(name, out_dir, missing):
    """How to get name (and the other missing shards) without this script."""
    others = f", likewise the other {missing - 1} missing shard(s)," if missing > 1 else ""
    return (f"fetch it by hand with `hf download {REPO_ID} {name} --repo-type dataset --local-dir {out_dir}` "
            f"(or from https://huggingface.co/datasets/{REPO_ID}/resolve/main/{name}){others} or copy the shards "
            f"into {out_dir}/")


def fetch(names, out_dir, download=hf_download, log=print):
    """Downloads the names missing from out_dir with download(name, out_dir); returns (fetched, skipped) names.
    A download that fails raises UsageError and leaves no file of its own behind."""
    created = not os.path.isdir(out_dir)
    writable_folder("out_dir", out_dir)
    missing = [name for name in names if not is_complete(os.path.join(out_dir, name))]
    skipped = [name for name in names if name not in missing]
    for i, name in enumerate(missing, 1):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):  # truncated: huggingface_hub would keep a file already at the destination
            os.remove(path)
            log(f"{name} is truncated: deleted, downloading it again")
        log(f"[{i}/{len(missing)}] downloading {name}")
        try:
            download(name, out_dir)
        except Exception as e:  # network, authentication and missing-file errors all end the run the same way
            if created and not os.listdir(out_dir):
                os.rmdir(out_dir)
            detail = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]
            raise UsageError(f"could not download {name} from huggingface.co/datasets/{REPO_ID} "
                             f"({type(e).__name__}: {detail}); {by_hand(name, out_dir, len(missing) - i + 1)}, "
                             "then run again") from None
        if not is_complete(path):
            if os.path.exists(path):
                os.remove(path)
            raise UsageError(f"{path}: the downloaded file is not a complete shard (deleted); run again, or "
                             f"{by_hand(name, out_dir, len(missing) - i + 1)}")
    return missing, skipped


def write_meta(out_dir):
    path = os.path.join(out_dir, "meta.json")
    write_json(path, {"tokenizer": "gpt2", "vocab_size": 50257, "source": f"huggingface.co/datasets/{REPO_ID}"})
    return path


def build_parser():
    parser = OneLineParser(description=f"Download GPT-2-tokenized FineWeb10B shards from {REPO_ID}.")
    parser.add_argument("n", nargs="?", type=int, default=None,
                        help=f"training shards to fetch, 100M tokens each, at most {MAX_TRAIN_SHARDS} (default: "
                             "as many as --max_iters steps of --preset read)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                        help=f"train_gpt.py preset whose steps set the default count (default {DEFAULT_PRESET})")
    parser.add_argument("--max_iters", type=int, default=None, metavar="N",
                        help="steps to fetch for (default: the preset's max_iters)")
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR, metavar="DIR",
                        help="download folder (default: data/fineweb10B beside this script)")
    return parser


def plan(args):
    """(train shards, the one line saying why)."""
    if args.max_iters is not None and args.max_iters <= 0:
        raise UsageError(f"--max_iters must be a positive integer, got {args.max_iters}")
    if args.n is not None and not 0 <= args.n <= MAX_TRAIN_SHARDS:
        raise UsageError(f"N = {args.n}: the repo holds training shards 1 to {MAX_TRAIN_SHARDS}; "
                         f"pass 0 to {MAX_TRAIN_SHARDS}, or no N to fetch what --preset/--max_iters need")
    needed, tokens = shards_needed(args.preset, args.max_iters)
    steps = PRESETS[args.preset]["max_iters"] if args.max_iters is None else args.max_iters
    reads = f"{args.preset}'s {steps:,} steps x {tokens_per_step(args.preset):,} tokens = {tokens:,} tokens"
    if args.n is not None:
        return args.n, f"val + {args.n} train shard(s), as asked ({reads} would need {needed})"
    if needed > MAX_TRAIN_SHARDS:
        return MAX_TRAIN_SHARDS, (f"val + all {MAX_TRAIN_SHARDS} train shards: {reads} need {needed}, so the "
                                  "loader will make more than one pass")
    return needed, f"val + {needed} train shard(s) of {SHARD_TOKENS // 10**6}M tokens: {reads}"


def main(argv=None, download=hf_download):
    args = build_parser().parse_args(argv)
    n, why = plan(args)
    print(why)
    t0 = time.time()
    fetched, skipped = fetch(shard_names(n), args.out_dir, download)
    meta = write_meta(args.out_dir)
    print(f"{len(fetched)} shard(s) downloaded, {len(skipped)} already present, in {args.out_dir} "
          f"({time.time() - t0:.0f}s); meta: {meta}")


if __name__ == "__main__":
    run_tool(main)
