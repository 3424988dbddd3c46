"""One on-disk layout for every trained model: `model.safetensors` (its state dict) + `config.json`.

Each model module says what its config holds (the spec or model config, and what the stage adds)
and rebuilds itself from it; writing and reading the two files happens here only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_weights(module: nn.Module, directory, config: dict) -> None:
    """The module's state dict and `config` into `directory` (created)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_weights(directory) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config) from a directory written by `save_weights`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    return load_file(directory / WEIGHTS_FILE), json.loads((directory / CONFIG_FILE).read_text())
