"""Stage `train-base`: the text-conditioned masked transformer over the low-res tokens."""

from __future__ import annotations

from muse.artifacts.store import Artifact
from muse.config import PipelineConfig
from muse.stage import OutputSpec, StageContext
from muse.transformer_training import masked_outputs, stage_config, train_masked_stage

NAME = "train-base"
INPUTS: tuple[str, ...] = ("tokens",)
OUTPUTS: tuple[str, ...] = ("base",)
CODE_VERSION = "2"


def config_of(config: PipelineConfig) -> dict:
    """See `stage_config`."""
    return stage_config(config, "train_base")


def outputs(config: PipelineConfig, input_versions: dict[str, str]) -> dict[str, OutputSpec]:
    """See `masked_outputs`: the warm-start artifact, when there is one, is an input too."""
    return masked_outputs(config, input_versions, "train_base", "base")


def run(ctx: StageContext) -> Artifact:
    """Train the base transformer on `tokens_low` and commit the `base` artifact."""
    return train_masked_stage(ctx, section="train_base", target="tokens_low", cond=None,
                              sampler=ctx.config.sampling.base)
