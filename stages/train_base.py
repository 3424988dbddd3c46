"""Stage `train-base`: the text-conditioned masked transformer over the low-res tokens."""

from __future__ import annotations

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig
from muse.transformer_training import train_masked_stage, stage_config

NAME = "train-base"
INPUTS: tuple[str, ...] = ("tokens",)
OUTPUTS: tuple[str, ...] = ("base",)
CODE_VERSION = "2"


def config_of(config: PipelineConfig) -> dict:
    """See `stage_config`."""
    return stage_config(config, "train_base")


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> Artifact:
    """Train the base transformer on `tokens_low` and commit the `base` artifact."""
    return train_masked_stage(config, inputs["tokens"], store, stage=NAME, code_version=CODE_VERSION,
                              section="train_base", kind="base", target="tokens_low", cond=None,
                              sampler=config.sampling.base)
