"""Sample grids while a masked transformer trains: what a person watches besides the loss.

At every checkpoint the training loop asks for a grid: a fixed set of val captions
(the same every time, so grids compare across steps) is decoded by the MaskGIT sampler
from the model being exported (its EMA copy when EMA is on), the token grids go through
the target's tokenizer decoder, and the images are laid out one per caption, the real
image's reconstruction from its own tokens in the row below; `labelled` adds the captions
and row names a person reads it by.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from muse.config import SamplerConfig
from muse.datasets.tokens import TokenTable, collate
from muse.labelled_grid import label_grid
from muse.micro_conditions import of_batch
from muse.models.vqgan import from_pretrained
from muse.sampling import decode


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> one row [H, B*W, 3] uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.concatenate(list(x), 1)


class SampleGrid:
    """Callable on a training loop: samples for `count` fixed captions, decoded, as an HWC uint8 grid."""

    def __init__(self, tokens_path, tokenizer_path, target: str, cond: str | None, text, device: torch.device,
                 sampler: SamplerConfig, count: int = 8):
        try:
            table = TokenTable(tokens_path, "val", None)
        except FileNotFoundError:
            table = TokenTable(tokens_path, "train", None)
        batch = collate([table[i] for i in range(min(count, len(table)))])
        self.batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.tokenizer = from_pretrained(tokenizer_path).to(device)
        self.target, self.cond, self.text, self.sampler, self.device = target, cond, text, sampler, device

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> np.ndarray:
        was_training = model.training
        model.eval()
        emb, mask = self.text(self.batch)
        cond = self.batch[self.cond] if self.cond else None
        micro = of_batch(model, self.batch)
        memory, memory_mask = model.memory(emb, mask, cond, None, micro)
        uncond, uncond_mask = model.memory(emb, torch.zeros_like(mask), cond, None, micro)
        generator = torch.Generator(self.device).manual_seed(0)
        tokens = decode(model, memory, memory_mask, uncond, uncond_mask, self.sampler, generator)
        side = model.spec.side
        sampled = self.tokenizer.decode_codes(tokens.view(-1, side, side))
        real = self.tokenizer.decode_codes(self.batch[self.target].view(-1, side, side))
        model.train(was_training)
        return np.concatenate([_to_uint8(sampled), _to_uint8(real)], 0)

    @property
    def captions(self) -> list[str]:
        return list(self.batch["caption"])

    def labelled(self, grid: np.ndarray, rows: list[str] | None = None) -> np.ndarray:
        """`grid` (a row of cells per entry of `rows`, default sampled over real) with its captions and row names."""
        return label_grid(grid, self.captions, rows or ["sampled", "real"])
