"""Targets spread over nearby codes (`train_base.code_smoothing`, `train_superres.code_smoothing`).

A tokenizer's codes are redundant in pixels: many of a real grid's tokens could take another
code and decode to the same picture, so a one-hot target asks the transformer for one arbitrary
code among several near-equivalent ones. Code smoothing moves a share `amount` of each masked
token's target onto the codes nearest its own in the tokenizer's quantized latent space,
weighted by softmax(-d^2 / tau), tau the median squared distance from a code to its nearest
other code. Only the NEIGHBOURS nearest codes (the code itself first) carry that share, so the
loss costs one gather per token rather than a codebook-by-codebook product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muse.models.vqgan import VQModel

# Nearest codes that share a target: at tau they hold nearly all of the softmax's mass.
NEIGHBOURS = 64


class CodeSmoothing:
    """Per-token cross-entropy against targets (1 - amount) one-hot + amount x the code's neighbourhood, with
    label smoothing on top as in `F.cross_entropy`."""

    def __init__(self, tokenizer: VQModel, amount: float):
        size = tokenizer.cfg.codebook_size
        device = next(tokenizer.parameters()).device
        with torch.no_grad():  # [1, D, 1, size]: every code as one row of a grid
            latents = tokenizer.codes_to_latents(torch.arange(size, device=device).view(1, 1, size))
        latents = latents.float().permute(0, 2, 3, 1).reshape(size, -1)
        d2 = torch.cdist(latents, latents).pow(2)
        tau = (d2 + torch.eye(size, device=device) * d2.max()).min(1).values.median().clamp_min(1e-12)
        distance, self.neighbours = d2.topk(min(NEIGHBOURS, size), dim=1, largest=False)  # [size, k]
        self.weights = torch.softmax(-distance / tau, dim=1)
        self.amount = amount

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """logits [B, N, size], target codes [B, N] -> per-token loss [B, N]."""
        logp = F.log_softmax(logits.float(), dim=-1)
        own = -logp.gather(-1, tokens[..., None])[..., 0]
        near = -(logp.gather(-1, self.neighbours[tokens]) * self.weights[tokens]).sum(-1)
        target = (1 - self.amount) * own + self.amount * near
        return (1 - label_smoothing) * target - label_smoothing * logp.mean(-1)
