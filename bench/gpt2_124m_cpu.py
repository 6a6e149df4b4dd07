#!/usr/bin/env python3
"""The full-size gpt2_124m model on this CPU, before renting a GPU: parameters, the time and peak memory of a training
step at batch 1, and the estimated peak GPU memory (train_gpt.estimate_train_memory) at the preset's micro-batch and
smaller ones, so a user with a 24 GB card knows which --batch_size fits.

    python bench/gpt2_124m_cpu.py [--steps 3] [--mtp_steps 1]

The CPU step runs in fp32 (the GPU path's bf16 autocast is slow on CPUs without bf16 units); its peak memory is the
process's peak resident size less what it held before the model existed, and the script prints the estimate for
the same step beside it as a check of the estimate.
"""
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402
from bench.cli import OneLineParser, positive_int, run_tool  # noqa: E402

GIB = 2 ** 30


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after one untimed step")
    parser.add_argument("--mtp_steps", type=int, default=1, help="predicted offsets (2+ adds MTP heads)")
    args = parser.parse_args(argv)
    positive_int("steps", args.steps)
    cfg = train_gpt.resolve_config(["--preset", "gpt2_124m", "--device", "cpu", "--mtp_steps", str(args.mtp_steps)])
    gcfg = train_gpt.gpt_config(cfg, train_gpt.GPT2_VOCAB_SIZE)
    before = peak_rss_bytes()
    torch.manual_seed(0)
    model = train_gpt.GPT(gcfg)
    optimizers = train_gpt.build_optimizers(model, cfg, torch.device("cpu"))
    params = list(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randint(0, train_gpt.GPT2_VOCAB_SIZE, (1, gcfg.block_size))
    y = torch.randint(0, train_gpt.GPT2_VOCAB_SIZE, (gcfg.mtp_steps, 1, gcfg.block_size))
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        loss, _, _ = model(x, y)
        loss.backward()
        train_gpt.optimizer_step(optimizers, scaler, params, cfg.grad_clip)
        if step:  # the first step allocates the optimizer state and warms the kernels
            times.append(time.perf_counter() - t0)
    measured = peak_rss_bytes() - before
    estimate_cpu = train_gpt.estimate_train_memory(gcfg, 1, "fp32")
    print(f"machine: {train_gpt.cpu_model()} ({os.cpu_count()} logical cores, torch threads "
          f"{torch.get_num_threads()}), torch {torch.__version__}")
    print(f"model: {train_gpt.describe_model(gcfg)} mtp_steps:{gcfg.mtp_steps}")
    print(f"CPU step, batch 1 x {gcfg.block_size} tokens, fp32, {cfg.optimizer}: median "
          f"{statistics.median(times):.2f} s over {len(times)} steps ({min(times):.2f}-{max(times):.2f} s)")
    print(f"CPU peak memory of the step: {measured / GIB:.2f} GiB measured (peak resident size less the "
          f"{before / GIB:.2f} GiB held before), {estimate_cpu / GIB:.2f} GiB estimated")
    print(f"estimated peak GPU memory, bf16, one process (the preset's micro-batch is {cfg.micro_batch_size}):")
    print("| --batch_size | accumulation steps | estimated peak | fits 24 GiB | fits 40 GiB | fits 80 GiB |")
    print("|---:|---:|---:|:---:|:---:|:---:|")
    global_sequences = cfg.batch_size * cfg.grad_accum_steps
    for micro in (64, 32, 16, 8, 4):
        need = train_gpt.estimate_train_memory(gcfg, micro, "bf16")
        fits = ["yes" if need <= train_gpt.MEMORY_HEADROOM * cap * GIB else "no" for cap in (24, 40, 80)]
        print(f"| {micro} | {global_sequences // micro} | {need / GIB:.1f} GiB | " + " | ".join(fits) + " |")


if __name__ == "__main__":
    run_tool(main)
