"""The prior of unCLIP (DALL-E 2): a caption's text embedding -> the CLIP image embedding of an image it names.

An MLP over the pooled caption embedding (the masked mean of the text encoder's token states,
as the transformers' memory holds them), residual blocks, and a unit-length output: DALL-E 2's
"deterministic" prior regressed on the cosine. A diffusion prior would sample several plausible
embeddings per caption; this one gives their mean direction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muse.models.saved import read_weights, save_weights


@dataclass(frozen=True)
class PriorSpec:
    text_dim: int
    image_dim: int
    dim: int = 256
    depth: int = 2


class Prior(nn.Module):
    def __init__(self, spec: PriorSpec):
        super().__init__()
        self.spec = spec
        self.inp = nn.Sequential(nn.LayerNorm(spec.text_dim), nn.Linear(spec.text_dim, spec.dim))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(spec.dim), nn.Linear(spec.dim, 2 * spec.dim), nn.GELU(),
                                                  nn.Linear(2 * spec.dim, spec.dim)) for _ in range(spec.depth))
        self.out = nn.Sequential(nn.LayerNorm(spec.dim), nn.Linear(spec.dim, spec.image_dim))

    def forward(self, pooled_text: torch.Tensor) -> torch.Tensor:
        """[B, text_dim] -> [B, image_dim], unit length."""
        x = self.inp(pooled_text)
        for block in self.blocks:
            x = x + block(x)
        return F.normalize(self.out(x), dim=-1)


def save_prior(prior: Prior, directory, extra: dict | None = None) -> None:
    save_weights(prior, directory, {"spec": asdict(prior.spec), **(extra or {})})


def load_prior(directory) -> tuple[Prior, dict]:
    state, config = read_weights(directory)
    prior = Prior(PriorSpec(**config["spec"]))
    prior.load_state_dict(state)
    return prior.eval(), config
