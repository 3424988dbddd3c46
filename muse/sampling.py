"""Iterative parallel decoding (MaskGIT/Muse) with classifier-free guidance.

Start from a grid of [MASK] (or a partly known grid for inpainting). Each step predicts
every masked token, samples a candidate per position (temperature annealed to 0, optional
top-k), and keeps the most confident candidates so that the number still masked follows
the cosine schedule; the rest are masked again. Known tokens never change.

With `order: halton` the kept tokens are instead the next masked positions of a Halton
sequence over the grid (Besnier et al. 2025), so the tokens of one step lie far apart.

Guidance: l_g = (1 + t) l_c - t l_u, with t rising linearly from 0 to `guidance_scale` over
the steps (or constant); l_u comes from the empty text, or from a negative prompt. The
conditional and unconditional passes share one batched forward, and every block's
cross-attention keys/values of the memory are computed once per image, not per step.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from muse.config import SamplerConfig
from muse.masking import masked_after_step
from muse.models.transformer import MaskedTransformer


def guidance_at(step: int, steps: int, scale: float, schedule: str) -> float:
    """t for this step: linear from 0 (first step) to `scale` (last step), or constant."""
    if schedule == "constant" or steps == 1:
        return scale
    return scale * step / (steps - 1)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + t) l_c - t l_u."""
    return (1 + t) * cond - t * uncond


def gumbel_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """-log(-log u): argmax(logits / T + noise) samples softmax(logits / T)."""
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def _filter_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if not k or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@functools.lru_cache(maxsize=8)
def halton_order(side: int) -> torch.Tensor:
    """[side*side] rank of every grid position in the 2-D Halton sequence (bases 2 and 3): the first positions
    cover the grid evenly and every later one falls between earlier ones."""
    def radical_inverse(i: int, base: int) -> float:
        out, f = 0.0, 1.0 / base
        while i:
            out, i, f = out + f * (i % base), i // base, f / base
        return out

    rank = torch.full((side * side,), -1, dtype=torch.long)
    seen, i = 0, 1
    while seen < side * side:
        pos = int(radical_inverse(i, 3) * side) * side + int(radical_inverse(i, 2) * side)
        if rank[pos] < 0:
            rank[pos], seen = seen, seen + 1
        i += 1
    return rank


@torch.no_grad()
def decode(model: MaskedTransformer, memory: torch.Tensor, memory_mask: torch.Tensor,
           uncond_memory: torch.Tensor | None, uncond_mask: torch.Tensor | None, cfg: SamplerConfig,
           generator: torch.Generator, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Token grids [B, N] from a memory; `tokens` with mask ids marks the positions to generate (inpainting)."""
    b = memory.shape[0]
    n = model.spec.side ** 2
    mask_id = model.spec.mask_id
    device = memory.device
    if tokens is None:
        tokens = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    tokens = tokens.clone()
    guided = uncond_memory is not None and cfg.guidance_scale > 0
    if guided:  # one batched forward: conditional rows first, then unconditional
        mem, mem_mask = torch.cat([memory, uncond_memory]), torch.cat([memory_mask, uncond_mask])
    else:
        mem, mem_mask = memory, memory_mask
    kv = model.memory_kv(mem)
    unknown = (tokens == mask_id).sum(1)  # per row
    halton = -halton_order(model.spec.side).to(device).float() if cfg.order == "halton" else None
    for step in range(cfg.steps):
        masked = tokens == mask_id
        if not masked.any():
            break
        logits = model(torch.cat([tokens, tokens]) if guided else tokens, mem, mem_mask, kv).float()
        if guided:
            logits = guided_logits(logits[:b], logits[b:],
                                   guidance_at(step, cfg.steps, cfg.guidance_scale, cfg.guidance_schedule))
        anneal = 1 - step / cfg.steps
        logits = _filter_top_k(logits, cfg.top_k)
        temperature = cfg.temperature * anneal
        if temperature > 0:
            sampled = (logits / temperature + gumbel_noise(logits.shape, generator, device)).argmax(-1)
        else:
            sampled = logits.argmax(-1)
        logp = F.log_softmax(logits, -1).gather(-1, sampled[..., None])[..., 0]
        if halton is None:
            confidence = logp + cfg.confidence_temperature * anneal * gumbel_noise(logp.shape, generator, device)
        else:  # earlier in the sequence counts as more confident
            confidence = halton.expand_as(logp).clone()
        confidence = confidence.masked_fill(~masked, float("inf"))  # known tokens are never re-masked
        candidate = torch.where(masked, sampled, tokens)
        still = torch.tensor([masked_after_step(step, cfg.steps, int(u)) for u in unknown], device=device)
        still = torch.minimum(still, masked.sum(1) - 1).clamp_min(0)  # unmask at least one per step
        if step == cfg.steps - 1:
            still.zero_()
        order = confidence.argsort(1)  # least confident first
        ranks = order.argsort(1)
        tokens = torch.where(ranks < still[:, None], torch.full_like(candidate, mask_id), candidate)
    return tokens
