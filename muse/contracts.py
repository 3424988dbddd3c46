"""What one stage writes and another reads, as typed records.

A stage that reads another's files reads them through these models, so a missing or
misnamed field is an error naming the file and the field, not a `None` found later:

- `TokensSchema`: a `tokens` artifact's `_schema.json` (written by tokenize; read by the
  transformer stages, train-guide and the token reader);
- `TransformerRecord`: a `base` / `superres` artifact's `config.json` beside the weights
  (written by the transformer stages; read by generation and train-guide);
- `metric(artifact, name)`: a figure another stage's manifest must hold (read by evaluate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from muse.artifacts.store import Artifact
from muse.config import SamplerConfig, TextEncoderConfig
from muse.errors import UserError


class ContractError(UserError, ValueError):
    """An artifact's file lacks a field another stage reads (written by another muse, or edited)."""


class Record(BaseModel):
    # Fields a newer writer adds are kept, not refused: an older reader still reads what it knows.
    model_config = ConfigDict(extra="allow", frozen=True)


R = TypeVar("R", bound=Record)


def read_record(model: type[R], path: Path) -> R:
    """`path` (JSON) as `model`; errors name the file and the first field that is wrong."""
    try:
        return model.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise ContractError(f"{path}: missing (not written by this muse's {model.__name__} writer)") from None
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ContractError(f"{path}: {field}: {first['msg']}") from None


class TokenGeometry(Record):
    """One token column's grid and the tokenizer that wrote it."""

    side: int
    codebook_size: int
    resolution: int
    tokenizer: str  # "kind:version"
    fsq_levels: list[int] = []  # FSQ ids' levels; tokens from tokenize code version 1 name none


class TextEmbeddings(Record):
    """Precomputed caption embeddings: the encoder that made them and their shape."""

    encoder: TextEncoderConfig
    dim: int
    max_length: int


class ImageEmbeddings(Record):
    """Precomputed CLIP image embeddings (`clip_image_emb`): the `clip` artifact that made them and their width."""

    clip: str  # "clip:version"
    dim: int


class TokensSchema(Record):
    FILE: ClassVar[str] = "_schema.json"

    geometry: dict[str, TokenGeometry]
    text: TextEmbeddings | None  # None: embeddings are computed at training time
    columns: dict[str, str] = {}  # column -> arrow type; absent in the oldest artifacts
    image: ImageEmbeddings | None = None  # None: no clip artifact was an input

    @classmethod
    def of(cls, tokens_dir) -> "TokensSchema":
        return read_record(cls, Path(tokens_dir) / cls.FILE)


class TransformerRecord(Record):
    """What a trained masked transformer was trained on, saved next to its weights."""

    FILE: ClassVar[str] = "config.json"

    spec: dict
    target: str
    cond: str | None
    scene: bool
    text: TextEmbeddings | None
    text_encoder: TextEncoderConfig
    tokenizers: dict[str, str]  # token column -> "kind:version"
    sampling: SamplerConfig | None = None  # the pass it was trained to be sampled with; absent before it was recorded
    adapter_of: str | None = None  # a LoRA adapter: "kind:version" of the weights it adapts; None = full weights
    micro_defaults: dict[str, float | None] | None = None  # micro-conditioned: the training rows' medians by name
    clip: str | None = None  # image-conditioned: "clip:version" whose image embeddings it was trained on

    @classmethod
    def of(cls, model_dir) -> "TransformerRecord":
        return read_record(cls, Path(model_dir) / cls.FILE)

    @property
    def max_length(self) -> int | None:
        """Caption tokens the model attends to: the precomputed embeddings' length; None = the encoder's own."""
        return None if self.text is None else self.text.max_length


def metric(artifact: Artifact, name: str):
    """A figure `artifact`'s manifest must hold; an error naming the artifact and the metric when it does not."""
    try:
        return artifact.manifest.metrics[name]
    except KeyError:
        raise ContractError(f"{artifact.ref}: no metric {name!r} (its stage wrote {', '.join(artifact.manifest.metrics)})"
                            ) from None
