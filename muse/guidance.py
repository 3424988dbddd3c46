"""Mid-layer guidance ("mid-u" classifier guidance) of a masked transformer while it samples.

A guide head (`muse.models.guide`) is trained on the hidden states one middle block of the
frozen transformer produces for partly masked grids, the model's own "noisy inputs". While
sampling, a forward hook on that block replaces its output h, row by row, with

    h + scale * rms(h) * g / rms(g),    g = d objective(h) / d h

before the upper blocks run, so the image drifts towards what the head scores high (the
caption, a class, a higher score); a negative scale steers away. The gradient runs through
the head only, never the transformer, and is deterministic, so sampling stays a function of
the seed; a scale of 0 registers no hook at all. The step is measured in the features' own
RMS per position, so one scale means the same push at any width.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from muse.models.guide import GuideHead
from muse.models.transformer import MaskedTransformer


@contextlib.contextmanager
def capture(model: MaskedTransformer, block: int) -> Iterator[list[torch.Tensor]]:
    """While open, every forward appends the output [B, N, dim] of `model.blocks[block]` to the yielded list."""
    captured: list[torch.Tensor] = []
    handle = model.blocks[block].register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    try:
        yield captured
    finally:
        handle.remove()


def features_at(model: MaskedTransformer, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                block: int) -> torch.Tensor:
    """The output of `model.blocks[block]` for these inputs, running only the blocks up to it."""
    return model.hidden(tokens, memory, memory_mask, blocks=block + 1)


def guidance_step(head: GuideHead, features: torch.Tensor, condition: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """Features moved along the normalised gradient of the head's objective (see the module docstring)."""
    with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        h = features.detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(head.objective(h, condition).sum(), h)
    rms_h = h.detach().pow(2).mean(-1, keepdim=True).sqrt()
    rms_g = grad.pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-12)
    return (h.detach() + scale * rms_h * grad / rms_g).to(features.dtype)


@contextlib.contextmanager
def steer(model: MaskedTransformer, head: GuideHead, condition: torch.Tensor | None, scale: float) -> Iterator[None]:
    """While open, every forward of `model` is guided by `head`. `condition` has one row per image ([b, text_dim]
    pooled captions, [b] class ids, or None for a score); a classifier-free-guided forward of k*b rows (the
    conditional rows, then the unconditional ones) steers each row towards its image's condition."""
    if scale == 0:
        yield
        return

    def hook(module, args, out: torch.Tensor) -> torch.Tensor:
        rows = out.shape[0] if condition is None else condition.shape[0]
        repeats = out.shape[0] // rows
        cond = None if condition is None else condition.repeat(repeats, *[1] * (condition.dim() - 1))
        return guidance_step(head, out, cond, scale)

    handle = model.blocks[head.spec.block].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
