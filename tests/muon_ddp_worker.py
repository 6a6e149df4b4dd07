"""Run Muon for a few steps under torchrun (Gloo, CPU) and save each rank's weights and owned-state indices.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/muon_ddp_worker.py OUT_DIR
tests/test_optimizers.py imports make_params/run_steps to compute the single-process result the ranks must match.
"""
import os
import sys

import torch
import torch.distributed as dist

from train_gpt import Muon

# Odd count and mixed tall/wide/square shapes, so the round-robin split is uneven and the gather needs padding.
SHAPES = [(12, 5), (5, 12), (8, 8), (7, 3), (4, 9)]
STEPS = 5
HPARAMS = {"lr": 0.03, "momentum": 0.9, "weight_decay": 0.05}


def make_params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in SHAPES]


def run_steps(params):
    opt = Muon(params, **HPARAMS)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        # Every rank draws the same gradients: what DDP's averaged all-reduce leaves on each rank.
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    params = make_params()
    opt = run_steps(params)
    owned = [i for i, p in enumerate(params) if "momentum_buffer" in opt.state[p]]
    torch.save({"params": [p.detach() for p in params], "owned": owned}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
