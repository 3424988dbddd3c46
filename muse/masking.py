"""Masking for training and the schedule for sampling (MaskGIT/Muse).

Training draws a mask rate r per sample, by default from p(r) = 2/pi (1 - r^2)^(-1/2) on [0, 1)
("arccos", Muse's): by inverse CDF, r = sin(pi u / 2) with u uniform, mean 2/pi = 0.64. "uniform"
draws r ~ U(0, 1), mean 0.5: more of the training at the mid and low rates where a grid's last
tokens (outlines, corners) are decided; "beta" draws r ~ Beta(2, 2) (the median of three
uniforms), mean 0.5 with under a third of uniform's mass within 0.1 of 0 or 1. Sampling unmasks
along the cosine curve in every case: after step t of T, a fraction cos(pi/2 (t+1)/T) of tokens
is still masked.
"""

from __future__ import annotations

import math

import torch


MASK_RATES = ("arccos", "uniform", "beta")  # the distributions `sample_mask_rate` draws from; the first is Muse's


def sample_mask_rate(batch: int, generator: torch.Generator | None = None, device=None,
                     distribution: str = MASK_RATES[0]) -> torch.Tensor:
    """One mask rate per sample: r ~ 2/pi (1 - r^2)^(-1/2) (Muse's "arccos"), r ~ U(0, 1) ("uniform") or
    r ~ Beta(2, 2) ("beta")."""
    if distribution == "beta":  # the median of three uniforms is Beta(2, 2), and keeps to the generator
        return torch.rand(batch, 3, generator=generator, device=device).median(dim=1).values
    u = torch.rand(batch, generator=generator, device=device)
    if distribution == "uniform":
        return u
    if distribution != "arccos":
        raise ValueError(f"mask rate distribution {distribution!r}: choose from {', '.join(MASK_RATES)}")
    return torch.sin(u * math.pi / 2)


def mask_tokens(tokens: torch.Tensor, rate: torch.Tensor, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ceil(r N) random positions per row (at least one); returns (masked tokens, bool mask)."""
    b, n = tokens.shape
    count = (rate * n).ceil().clamp(1, n).long().to(tokens.device)
    # drawn where the generator lives (a CPU generator gives the same masks for tokens on any device)
    scores = torch.rand(b, n, generator=generator,
                        device=generator.device if generator is not None else tokens.device).to(tokens.device)
    ranks = scores.argsort(1).argsort(1)
    mask = ranks < count[:, None]
    return tokens.masked_fill(mask, mask_id), mask


def masked_after_step(step: int, steps: int, n: int) -> int:
    """Tokens still masked after sampling step `step` (0-based) of `steps`: cosine schedule, 0 at the end."""
    return int(math.floor(n * math.cos(math.pi / 2 * (step + 1) / steps)))
