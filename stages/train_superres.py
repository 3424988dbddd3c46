"""Stage `train-superres`: high-res tokens from the low-res tokens and the text (trained on ground-truth
low-res tokens, so it needs nothing from `train-base`)."""

from __future__ import annotations

from muse.artifacts.store import Artifact
from muse.config import PipelineConfig
from muse.stage import OutputSpec, StageContext
from muse.transformer_training import masked_outputs, stage_config, train_masked_stage

NAME = "train-superres"
INPUTS: tuple[str, ...] = ("tokens",)
OUTPUTS: tuple[str, ...] = ("superres",)
CODE_VERSION = "2"


def config_of(config: PipelineConfig) -> dict:
    """See `stage_config`."""
    return stage_config(config, "train_superres")


def outputs(config: PipelineConfig, input_versions: dict[str, str]) -> dict[str, OutputSpec]:
    """See `masked_outputs`: the warm-start artifact, when there is one, is an input too."""
    return masked_outputs(config, input_versions, "train_superres", "superres")


def run(ctx: StageContext) -> Artifact:
    """Train the super-res transformer on `tokens_high` given `tokens_low`; commit `superres`."""
    return train_masked_stage(ctx, section="train_superres", target="tokens_high", cond="tokens_low",
                              sampler=ctx.config.sampling.superres)
