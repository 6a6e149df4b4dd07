#!/usr/bin/env python3
"""How many val tokens a stable estimate needs: the val loss of a trained model over disjoint subsets of the val
split, by subset size.

    python bench/val_spread.py [--model logs/RUN/model.pt] [--data data/shakespeare_char]

Without --model it first trains what `./run.sh` trains on the CPU (the shakespeare_char preset, speedrun recipe, to
its target) into a temporary folder. The val split is cut into the windows validation scores (block_size tokens
each, in order); for each subset size the windows are split into disjoint runs of consecutive windows, as
--val_tokens takes the first ones, and the table gives the spread of those runs' mean losses and how far the first
run (what --val_tokens N scores) lies from the whole split's loss. A second table does the same for screens
(--val_screen_tokens): windows spread evenly over the val set, every k-th one, each offset a disjoint screen.
"""
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt  # noqa: E402
from bench.cli import OneLineParser, UsageError, positive_int, run_tool  # noqa: E402

SIZES = [16_384, 32_768, 65_536, 131_072, 262_144]
SCREEN_SIZES = [8_192, 16_384, 32_768]


def train_reference(data, folder):
    """Trains run.sh's CPU run to its target; returns the saved model's path."""
    train_gpt.main(["--preset", "shakespeare_char", "--device", "cpu", "--log_dir", folder, "--run_id", "spread",
                    "--input_bin", os.path.join(data, "train_*.bin"),
                    "--input_val_bin", os.path.join(data, "val_*.bin")])
    return os.path.join(folder, "spread", "model.pt")


@torch.no_grad()
def window_losses(model_path, data, batch=256):
    """The mean next-token loss of every block_size window of the val split, in order."""
    model, trained, _ = train_gpt.load_model(model_path, "--model")
    T = model.cfg.block_size
    shard = train_gpt.find_shards(os.path.join(data, "val_*.bin"), "validation")[0]
    meta = train_gpt.load_meta(os.path.join(data, "val_*.bin"))
    if (meta["tokenizer"], meta.get("chars")) != (trained["tokenizer"], trained.get("chars")):
        raise UsageError(f"--data {data} holds another tokenizer's shards than --model {model_path} was trained on; "
                         "give the --data the model was trained on")
    tokens = torch.from_numpy(train_gpt.read_shard(shard).astype("int64"))
    n = (len(tokens) - train_gpt.MAX_MTP_STEPS) // T
    if n < 2:
        raise UsageError(f"--data {data}: the val split holds {len(tokens)} tokens, fewer than two windows of "
                         f"block_size {T}; give a larger val split")
    losses = []
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        x = tokens[start * T:(start + rows) * T].view(rows, T)
        y = tokens[start * T + 1:(start + rows) * T + 1].view(rows, T)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        losses += loss.view(rows, T).mean(dim=1).tolist()
    return losses, T


def spread_row(size, means, reference):
    """A table row: the subsets' size and count, the std of their mean losses, the largest deviation from the
    reference loss, and the first subset's."""
    return (f"| {size:,} | {len(means)} | {statistics.stdev(means):.4f} | "
            f"{max(abs(m - reference) for m in means):.4f} | {means[0] - reference:+.4f} |")


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model.pt (default: train run.sh's CPU run first)")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "shakespeare_char"), help="the shards' folder")
    parser.add_argument("--val_tokens", type=int, default=train_gpt.PRESETS["shakespeare_char"]["val_tokens"],
                        help="the val set the screens sample (default: the shakespeare_char preset's)")
    args = parser.parse_args(argv)
    positive_int("val_tokens", args.val_tokens)
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or train_reference(args.data, folder)
        losses, T = window_losses(model, args.data)
    if args.val_tokens // T < 2:
        raise UsageError(f"--val_tokens {args.val_tokens} is fewer than two windows of block_size {T}: give at "
                         f"least {2 * T}")
    whole = statistics.fmean(losses)
    print(f"val split of {args.data}: {len(losses)} windows of {T} tokens ({len(losses) * T:,} tokens), "
          f"loss {whole:.4f}")
    print("| val tokens | disjoint subsets | std of their losses | largest deviation | first subset - whole |")
    print("|---:|---:|---:|---:|---:|")
    for size in SIZES:
        k = size // T
        means = [statistics.fmean(losses[i:i + k]) for i in range(0, len(losses) - k + 1, k)]
        if len(means) >= 2:
            print(spread_row(size, means, whole))
    val_set = losses[:args.val_tokens // T]
    scored = statistics.fmean(val_set)
    print(f"\nscreens of the first {len(val_set) * T:,} tokens (--val_tokens, loss {scored:.4f}): every k-th window, "
          "each offset a disjoint screen")
    print("| screen tokens | disjoint screens | std of their losses | largest deviation | first screen - set |")
    print("|---:|---:|---:|---:|---:|")
    for size in SCREEN_SIZES:
        k = len(val_set) // max(1, size // T)
        if k >= 2:  # at least two disjoint screens of that size
            print(spread_row(size, [statistics.fmean(val_set[offset::k]) for offset in range(k)], scored))
    return 0


if __name__ == "__main__":
    run_tool(main)
