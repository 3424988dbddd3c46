"""Per-token loss weights that favour outline tokens (`train_base.edge_weight`, `train_superres.edge_weight`).

A grid of flat shapes on a plain background is mostly interior and background, which a
masked transformer learns first; the few tokens an outline passes through decide whether a
square reads as a square. The weights find those tokens in pixels: the target grid is decoded
by its own tokenizer, and a token is on an edge when, at some pixel of its patch, the colour
steps to the next pixel right and below add up to more than EDGE_STEP.
Edge tokens weigh `edge_weight`, the rest 1; the loss is then the weighted mean over the
masked tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muse.models.vqgan import VQModel

# |RGB step| to the right plus below, images in [-1, 1]: a change of colour, well above the demo's
# colour jitter (+-15 of 255 a channel) and a tokenizer's reconstruction noise.
EDGE_STEP = 0.5


def edge_tokens(images: torch.Tensor, side: int) -> torch.Tensor:
    """[B, 3, H, W] images in [-1, 1] -> [B, side * side] bool: the tokens whose H/side x W/side pixel patch
    holds a colour edge (the steps to the right and below count for the pixel they start at)."""
    right = (images[..., :, 1:] - images[..., :, :-1]).abs().sum(1)
    below = (images[..., 1:, :] - images[..., :-1, :]).abs().sum(1)
    step = F.pad(right, (0, 1)) + F.pad(below, (0, 0, 0, 1))
    patch = images.shape[-1] // side
    return (F.max_pool2d(step[:, None], patch)[:, 0] > EDGE_STEP).flatten(1)


class EdgeWeights:
    """Token grids [B, side * side] -> loss weights: `weight` on the tokens of an edge of the decoded grid, 1
    elsewhere."""

    def __init__(self, tokenizer: VQModel, weight: float):
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.weight = weight
        self.side = tokenizer.cfg.token_side

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        images = self.tokenizer.decode_codes(tokens.view(-1, self.side, self.side))
        return 1 + (self.weight - 1) * edge_tokens(images.float(), self.side).float()
