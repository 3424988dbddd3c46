"""Stage `train-base`: the text-conditioned masked transformer over the low-res tokens."""

from __future__ import annotations

from muse.artifacts.store import Artifact
from muse.config import PipelineConfig
from muse.stage import StageContext
from muse.transformer_training import stage_config, train_masked_stage

NAME = "train-base"
INPUTS: tuple[str, ...] = ("tokens",)
OUTPUTS: tuple[str, ...] = ("base",)
CODE_VERSION = "2"


def config_of(config: PipelineConfig) -> dict:
    """See `stage_config`."""
    return stage_config(config, "train_base")


def run(ctx: StageContext) -> Artifact:
    """Train the base transformer on `tokens_low` and commit the `base` artifact."""
    return train_masked_stage(ctx, section="train_base", target="tokens_low", cond=None,
                              sampler=ctx.config.sampling.base)
