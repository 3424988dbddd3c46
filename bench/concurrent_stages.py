"""Benchmark: two training loops in threads of one process, as the flow runs train-base beside super-res.

    python bench/concurrent_stages.py [--steps 40]

Times the tiny preset's base train step (dim 128, depth 3, 16x16 tokens in 2x2 patches, batch 32,
AdamW) alone with the default torch threads and with one, then two such loops side by side in
Python threads with the default threads and with one torch thread each. It prints seconds a step
and the pair's throughput against running the two one after the other: what concurrent stages
buy on a CPU, and what pinning each to one thread would add.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
import torch.nn.functional as F

from timing import seconds_per_call

from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.transformer_training import MaskedLM

CODEBOOK, SIDE, TEXT_LEN, TEXT_DIM, BATCH = 256, 16, 32, 384, 32


def train_step(seed: int):
    """One optimizer step of a tiny-preset base on a fixed batch, as a closure."""
    torch.manual_seed(seed)
    model = MaskedTransformer(TransformerSpec(dim=128, depth=3, heads=4, codebook_size=CODEBOOK, side=SIDE,
                                              text_dim=TEXT_DIM, patch=2))
    lm = MaskedLM(model)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CODEBOOK, (BATCH, SIDE * SIDE), generator=g)
    masked = torch.rand(BATCH, SIDE * SIDE, generator=g) < 0.5
    text, text_mask = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g), torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    inputs = tokens.masked_fill(masked, model.spec.mask_id)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    def step():
        logits = lm(inputs, text, text_mask, None, None)
        loss = (F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none") * masked).sum() / masked.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def seconds_a_step(step, steps: int, threads: int | None = None) -> float:
    """Mean seconds a step after one warm-up step; `threads` sets this thread's torch threads first."""
    if threads is not None:
        torch.set_num_threads(threads)
    return seconds_per_call(step, steps, torch.device("cpu"))


def side_by_side(steps_fns, steps: int, threads: int | None) -> float:
    """Wall seconds a step (of each loop) with the loops running together in Python threads."""
    threads_ = [threading.Thread(target=seconds_a_step, args=(fn, steps, threads)) for fn in steps_fns]
    t = time.perf_counter()
    for th in threads_:
        th.start()
    for th in threads_:
        th.join()
    return (time.perf_counter() - t) / (steps + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    default = torch.get_num_threads()
    a, b = train_step(0), train_step(1)
    alone = seconds_a_step(a, args.steps)
    one = seconds_a_step(a, args.steps, threads=1)
    torch.set_num_threads(default)
    pair_default = side_by_side([a, b], args.steps, None)
    pair_one = side_by_side([a, b], args.steps, 1)
    torch.set_num_threads(default)
    print(f"torch threads {default}; base train step, batch {BATCH}, {args.steps} steps a row")
    print(f"alone, {default} threads: {alone:.3f} s a step; alone, 1 thread: {one:.3f} s ({one / alone:.2f}x)")
    for name, sec in ((f"side by side, {default} threads each", pair_default), ("side by side, 1 thread each", pair_one)):
        print(f"{name}: {sec:.3f} s a step; throughput {2 * alone / sec:.2f}x one after the other")


if __name__ == "__main__":
    main()
