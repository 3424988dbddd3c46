"""LoRA adapters on a trained masked transformer, through peft: train few weights, save a small artifact.

A LoRA run (`train_base.lora` / `train_superres.lora`, with `init` naming the trained model) injects
low-rank adapters into the named linear layers and freezes everything else, so the optimizer
updates only the adapters. Its artifact holds the adapters alone (`adapter_model.safetensors` and
peft's `adapter_config.json`, loadable with peft) and names the weights they sit on in its
`config.json` (`adapter_of`); `load_trained` rebuilds the full model from the store: the base's
weights with the adapters merged in, so sampling costs what it costs without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import ConfigError, LoraConfig
from muse.contracts import TransformerRecord
from muse.models.transformer import MaskedTransformer, load_transformer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_config(cfg: LoraConfig):
    """The peft `LoraConfig` of these settings."""
    import peft

    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                           lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none")


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Inject adapters into `model` (in place) and leave only them trainable; returns `model`."""
    import peft

    try:
        peft.inject_adapter_in_model(peft_config(cfg), model)
    except ValueError as e:  # peft's message lists what it looked for
        raise ConfigError(f"lora.target_modules {list(cfg.target_modules)}: {e}".splitlines()[0]) from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone, under peft's saved names."""
    import peft

    return {k: v.detach().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}


def save_adapter(model: nn.Module, cfg: LoraConfig, directory: Path, record: dict) -> None:
    """Adapter weights, peft's adapter config and the transformer's `config.json` record into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg).to_dict(), indent=2, default=list))
    (directory / TransformerRecord.FILE).write_text(json.dumps(record, indent=2))


def is_adapter(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_WEIGHTS).is_file()


def load_adapter(model: nn.Module, directory: Path) -> nn.Module:
    """`model` with the adapters saved in `directory` injected and loaded (not merged); returns `model`."""
    import peft

    directory = Path(directory)
    config = peft.LoraConfig.from_pretrained(str(directory))
    peft.inject_adapter_in_model(config, model)
    result = peft.set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))
    if result.unexpected_keys:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: weights for layers the model lacks: "
                         f"{result.unexpected_keys[:3]}")
    return model


def merged(model: nn.Module) -> nn.Module:
    """`model` with every adapter folded into the layer it adapts (W + scale * B @ A), peft's layers removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


def load_trained(store: ArtifactStore, artifact: Artifact) -> MaskedTransformer:
    """A base / super-res artifact's model in eval mode: its own weights, or (an adapter artifact) the weights it
    adapts, resolved in `store`, with its adapters merged in."""
    if not is_adapter(artifact.path):
        return load_transformer(artifact.path)[0]
    record = TransformerRecord.of(artifact.path)
    model = load_trained(store, store.resolve(record.adapter_of))
    return merged(load_adapter(model, artifact.path)).eval()
