"""Benchmark: Muon's Newton-Schulz orthogonalisation per optimizer step, one matrix at a time vs stacked by shape.

    python bench/muon_step.py [--calls 30]

For the tiny preset's base and super-res transformers (random weights, the preset's widths),
times the orthogonalisation of every hidden matrix's update as `MuonAdamW.step` runs it
(`orthogonalised_together`: the matrices of one shape in one batched product) against one
`orthogonalised` call per matrix, in the same run, and prints ms per step and the ratio. On a
small model the per-matrix products are too small to keep the cores busy, so batching them
is where the step's optimizer time goes down.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from timing import seconds_per_call

from muse.config import load_config
from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.muon import hidden_matrices, orthogonalised, orthogonalised_together

TEXT_DIM = 384  # all-MiniLM-L6-v2, the tiny preset's text encoder


def tiny_models() -> dict[str, MaskedTransformer]:
    config = load_config("tiny", None, [])
    base, sr = config.train_base.model, config.train_superres.model
    low, high = config.train_vqgan.low, config.train_vqgan.high
    return {
        "base": MaskedTransformer(TransformerSpec(dim=base.dim, depth=base.depth, heads=base.heads,
                                                  codebook_size=low.codebook_size, side=low.token_side,
                                                  text_dim=TEXT_DIM, patch=base.patch)),
        "superres": MaskedTransformer(TransformerSpec(dim=sr.dim, depth=sr.depth, heads=sr.heads,
                                                      codebook_size=high.codebook_size, side=high.token_side,
                                                      text_dim=TEXT_DIM, cond_codebook_size=low.codebook_size,
                                                      cond_side=low.token_side, cond_depth=sr.cond_depth,
                                                      cond_aligned=sr.cond_aligned, cond_upsample=sr.cond_upsample,
                                                      patch=sr.patch)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    for name, model in tiny_models().items():
        ids = hidden_matrices(model, skip=("head",))
        updates = [torch.randn_like(p) for p in model.parameters() if id(p) in ids]
        shapes = Counter(tuple(u.shape) for u in updates)
        one = seconds_per_call(lambda: [orthogonalised(u) for u in updates], args.calls, cpu)
        stacked = seconds_per_call(lambda: orthogonalised_together(updates), args.calls, cpu)
        print(f"{name}: {len(updates)} hidden matrices in {len(shapes)} shapes; one at a time {one * 1e3:.1f} ms, "
              f"stacked {stacked * 1e3:.1f} ms per step ({one / stacked:.2f}x)")


if __name__ == "__main__":
    main()
