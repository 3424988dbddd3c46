"""The DAG: which stage produces which artifact kinds, and in what order stages run.

Edges are derived from the stage modules' INPUTS and OUTPUTS, so adding a stage
means adding its module to `STAGES`; nothing else lists dependencies.
"""

from __future__ import annotations

from types import ModuleType

from muse.config import ConfigError

from muse.stages import (
    evaluate,
    finetune_decoder,
    segment,
    shard,
    tokenize,
    train_base,
    train_clip,
    train_guide,
    train_prior,
    train_superres,
    train_vqgan,
)

FULL_TRAIN = "full-train"

# Topological order: every stage comes after the producers of its inputs.
STAGES: dict[str, ModuleType] = {
    m.NAME: m
    for m in (shard, train_clip, segment, train_vqgan, tokenize, train_base, train_guide, train_prior, train_superres,
              finetune_decoder, evaluate)
}

PRODUCER: dict[str, str] = {kind: name for name, m in STAGES.items() for kind in m.OUTPUTS}

TARGETS: tuple[str, ...] = (FULL_TRAIN, *STAGES)


def upstream_stages(name: str, config=None) -> list[str]:
    """Stages whose outputs `name` reads directly: under `config` (`inputs_of`), else any it may read."""
    kinds = STAGES[name].INPUTS if config is None else inputs_of(name, config)
    return sorted({PRODUCER[kind] for kind in kinds}, key=list(STAGES).index)


def stages_for(target: str, config) -> list[str]:
    """Stages a target runs, in topological order: every enabled one, or the one named (even if disabled)."""
    if target == FULL_TRAIN:
        return [name for name, m in STAGES.items() if getattr(m, "enabled", lambda c: True)(config)]
    if target not in STAGES:
        raise ConfigError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    return [target]


def inputs_of(name: str, config) -> tuple[str, ...]:
    """The input kinds a stage reads under this config: `inputs_of(config)` where the stage has one (optional in
    the stage protocol), else all of INPUTS, which lists every kind it may read (the DAG's edges)."""
    own = getattr(STAGES[name], "inputs_of", None)
    return STAGES[name].INPUTS if own is None else own(config)


def preflight(names: list[str], config) -> list[str]:
    """Each of these stages' `preflight(config)` (optional in the stage protocol): what can be checked before
    anything runs (extras, weights, scene maps). Raises the first user error; returns what they will do."""
    return [check(config) for name in names if (check := getattr(STAGES[name], "preflight", None)) is not None]


def _check() -> None:
    order = list(STAGES)
    for name, m in STAGES.items():
        for kind in m.INPUTS:
            if kind not in PRODUCER:
                raise RuntimeError(f"stage {name} reads {kind!r}, which no stage produces")
            if order.index(PRODUCER[kind]) >= order.index(name):
                raise RuntimeError(f"stage {name} is listed before {PRODUCER[kind]}, which it depends on")


_check()
