"""Stage `train-superres`: high-res tokens from the low-res tokens and the text (trained on ground-truth
low-res tokens, so it needs nothing from `train-base`)."""

from __future__ import annotations

import torch

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig
from muse.transformer_training import train_transformer

NAME = "train-superres"
INPUTS: tuple[str, ...] = ("tokens",)
OUTPUTS: tuple[str, ...] = ("superres",)
CODE_VERSION = "2"  # 2: masks and condition dropout from the stage's own generator


def config_of(config: PipelineConfig) -> dict:
    """The model and training config (the knobs that change the weights), and the text encoder when embeddings are
    computed at training time; not the sampler pass the model records for generation (it changes no weight)."""
    c = config.train_superres
    return {"train_superres": c.model_dump(mode="json") | {"train": c.train.versioned()},
            "text_encoder": config.tokenize.text_encoder.model_dump(mode="json")}


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> Artifact:
    """Train the super-res transformer on `tokens_high` given `tokens_low`; commit `superres`."""
    c = config.train_superres
    tokens = inputs["tokens"]
    create = {"stage": NAME, "config": config_of(config), "inputs": {"tokens": tokens.version},
              "code_version": CODE_VERSION}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return train_transformer(kind="superres", stage=NAME, model_cfg=c.model, train_cfg=c.train, workers=c.workers,
                             ray_cfg=config.ray,
                             text_drop_rate=c.text_drop_rate, label_smoothing=c.label_smoothing,
                             scene=c.scene_conditioning, scene_drop_rate=c.scene_drop_rate,
                             tokens=tokens, target="tokens_high", cond="tokens_low",
                             text_cfg=config.tokenize.text_encoder, sampler=config.sampling.superres, store=store,
                             create_kwargs=create, device=device)
