"""The guide head of mid-layer guidance: a small model on a masked transformer's hidden states.

Hidden states [B, N, D] of one block are normalised, pooled over the grid by a learned
attention query (plus their mean), and mapped by an MLP to what the target needs:

- caption: an embedding compared by cosine with the projected (mean-pooled) caption
  embedding; trained CLIP-style, contrastively over the batch;
- label: logits over the dataset's classes;
- score: one number (regression), or logits over quantile bins of the train values.

`objective(features, condition)` is the per-row quantity guidance climbs: the scaled cosine
with the caption, the log-probability of the wanted class, or the (expected) score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muse.models.saved import read_weights, save_weights


@dataclass(frozen=True)
class GuideSpec:
    """Everything that fixes the head (saved next to its weights)."""

    feature_dim: int  # the hooked transformer's width
    block: int  # index of the hooked block (its output is read)
    target: str  # caption | label | score
    dim: int = 128
    text_dim: int = 0  # caption: width of the caption embeddings
    classes: tuple[str, ...] = ()  # label: class names, in logit order
    bin_edges: tuple[float, ...] = ()  # score: inner edges of the quantile bins; () = regression
    bin_centres: tuple[float, ...] = ()  # score with bins: the mean train value in each bin

    @property
    def outputs(self) -> int:
        if self.target == "caption":
            return self.dim
        if self.target == "label":
            return len(self.classes)
        return len(self.bin_centres) if self.bin_edges else 1


class GuideHead(nn.Module):
    def __init__(self, spec: GuideSpec):
        super().__init__()
        self.spec = spec
        d, h = spec.feature_dim, spec.dim
        self.norm = nn.LayerNorm(d)
        self.query = nn.Linear(d, 1)  # attention pooling: where on the grid to look
        self.mlp = nn.Sequential(nn.Linear(2 * d, h), nn.GELU(), nn.Linear(h, spec.outputs))
        if spec.target == "caption":
            self.text_proj = nn.Sequential(nn.LayerNorm(spec.text_dim), nn.Linear(spec.text_dim, h))
            self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N, D] hidden states -> [B, outputs]."""
        x = self.norm(features.float())
        weights = self.query(x).softmax(1)
        return self.mlp(torch.cat([(weights * x).sum(1), x.mean(1)], -1))

    def caption_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, T] scaled cosines between each image's features and each of T pooled caption embeddings [T, text_dim]."""
        image = F.normalize(self(features), dim=-1)
        caption = F.normalize(self.text_proj(text.float()), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * image @ caption.T

    def objective(self, features: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """[B] what guidance raises: caption cosine (condition: [B, text_dim]), log p(class) (condition: [B] class
        ids), or the predicted score (condition: None)."""
        spec = self.spec
        if spec.target == "caption":
            image = F.normalize(self(features), dim=-1)
            caption = F.normalize(self.text_proj(condition.float()), dim=-1)
            return self.logit_scale.exp().clamp(max=100) * (image * caption).sum(-1)
        out = self(features)
        if spec.target == "label":
            return out.log_softmax(-1).gather(-1, condition[:, None])[:, 0]
        if spec.bin_edges:
            return out.softmax(-1) @ torch.tensor(spec.bin_centres, device=out.device)
        return out[:, 0]


def save_guide(head: GuideHead, directory, extra: dict | None = None) -> None:
    """`model.safetensors` + `config.json` (the spec and anything in `extra`)."""
    save_weights(head, directory, {"spec": asdict(head.spec), **(extra or {})})


def load_guide(directory) -> tuple[GuideHead, dict]:
    """(head in eval mode, the saved config) from a directory written by `save_guide`."""
    state, config = read_weights(directory)
    spec = config["spec"]
    head = GuideHead(GuideSpec(**{**spec, **{k: tuple(spec[k]) for k in ("classes", "bin_edges", "bin_centres")}}))
    head.load_state_dict(state)
    return head.eval(), config
