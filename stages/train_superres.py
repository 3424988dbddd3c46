"""Stage `train-superres`: high-res tokens from the low-res tokens and the text (trained on ground-truth
low-res tokens, so it needs nothing from `train-base`)."""

from __future__ import annotations

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig
from muse.transformer_training import train_masked_stage, stage_config

NAME = "train-superres"
INPUTS: tuple[str, ...] = ("tokens",)
OUTPUTS: tuple[str, ...] = ("superres",)
CODE_VERSION = "2"


def config_of(config: PipelineConfig) -> dict:
    """See `stage_config`."""
    return stage_config(config, "train_superres")


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> Artifact:
    """Train the super-res transformer on `tokens_high` given `tokens_low`; commit `superres`."""
    return train_masked_stage(config, inputs["tokens"], store, stage=NAME, code_version=CODE_VERSION,
                              section="train_superres", kind="superres", target="tokens_high", cond="tokens_low",
                              sampler=config.sampling.superres)
