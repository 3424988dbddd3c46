"""Benchmark: peak GPU memory and samples/s of each training stage at a preset's widths and micro-batch, per
memory knob (`train.activation_checkpointing`, `train.optimizer`).

    python bench/train_memory.py [--preset muse-512] [--steps 5] [--rows vqgan-low base ...]

Each row runs full optimizer steps as `muse.training.TrainLoop` does: the stage's own objective, the
optimizer from `make_optimizer`, `checkpoint_blocks` when checkpointing is on, bf16 autocast on a GPU,
eager (the presets compile the transformers, which lowers their memory further), without the EMA copy a
preset with `ema_decay` also holds (4 bytes per parameter). The tokenizers and the
decoder run their reconstruction, codebook and PatchGAN losses (the GAN on, as after `disc_start`; LPIPS
off, its VGG weights are a download). The transformers read random tokens and T5-XXL-wide (4096) caption
embeddings of the preset's caption length. `--batch-scale 2` doubles every micro-batch (what checkpointing
buys), 0.5 halves it. A row that does not fit prints `out of memory` and the next one runs.
"""

from __future__ import annotations

import argparse
import gc

import torch

from timing import device_and_autocast, seconds_per_call

from muse.config import TrainConfig, VQLossConfig, load_config
from muse.contracts import TokenGeometry
from muse.distributed import autocast
from muse.errors import UserError
from muse.models.transformer import MaskedTransformer
from muse.models.vqgan import LatentDecoder, VQModel
from muse.training import checkpoint_blocks, make_optimizer
from muse.transformer_training import CaptionMemory, MaskedObjective, transformer_spec

T5_XXL_WIDTH = 4096
KNOBS = {"plain": {}, "checkpointed": {"activation_checkpointing": True}, "adamw8bit": {"optimizer": "adamw8bit"}}


def image_objective(config, section: str, device):
    """(objective, one batch of images) for vqgan-low / vqgan-high, or the finetuned decoder."""
    from muse.stages.finetune_decoder import DecoderObjective
    from muse.stages.train_vqgan import ImageObjective

    loss = VQLossConfig(**(config.train_vqgan.loss.model_dump() | {"disc_start": 0}))
    if section == "decoder":
        cfg = config.train_vqgan.high
        ft = config.finetune_decoder
        decoder = LatentDecoder(cfg, 3, ft.extra_res_blocks, ft.channel_mult).to(device)
        objective = DecoderObjective(VQModel(cfg).to(device), decoder, loss, None)
        batch = ft.train.batch_size
    else:
        cfg = getattr(config.train_vqgan, section)
        objective = ImageObjective(VQModel(cfg).to(device), loss, None)
        batch = config.train_vqgan.train.batch_size
    for m in objective.modules.values():
        m.to(device)
    side = cfg.resolution
    return objective, lambda scale: torch.rand(max(1, int(batch * scale)), 3, side, side, device=device) * 2 - 1


def masked_objective(config, section: str, device):
    """(objective, one batch of tokens and caption embeddings) for the base or the super-res transformer."""
    low, high = config.train_vqgan.low, config.train_vqgan.high
    geometry = {"tokens_low": TokenGeometry(side=low.token_side, codebook_size=low.codebook_size,
                                            resolution=low.resolution, tokenizer="vqgan-low:bench"),
                "tokens_high": TokenGeometry(side=high.token_side, codebook_size=high.codebook_size,
                                             resolution=high.resolution, tokenizer="vqgan-high:bench")}
    stage = getattr(config, section)
    target, cond = ("tokens_low", None) if section == "train_base" else ("tokens_high", "tokens_low")
    spec = transformer_spec(stage.model, geometry, T5_XXL_WIDTH, target, cond, scene=False)
    model = MaskedTransformer(spec).to(device)
    objective = MaskedObjective(model, target, CaptionMemory(config.tokenize.text_encoder, True, device),
                                stage.text_drop_rate, stage.label_smoothing, cond)
    text_len = config.tokenize.text_encoder.max_length

    def batch(scale: float) -> dict:
        b = max(1, int(stage.train.batch_size * scale))
        out = {target: torch.randint(0, spec.codebook_size, (b, spec.side ** 2), device=device),
               "text_emb": torch.randn(b, text_len, T5_XXL_WIDTH, device=device),
               "text_len": torch.full((b,), text_len, device=device)}
        if cond:
            out[cond] = torch.randint(0, spec.cond_codebook_size, (b, spec.cond_side ** 2), device=device)
        return out

    return objective, batch


ROWS = {"vqgan-low": (image_objective, "low", "train_vqgan"), "vqgan-high": (image_objective, "high", "train_vqgan"),
        "decoder": (image_objective, "decoder", "finetune_decoder"),
        "base": (masked_objective, "train_base", "train_base"),
        "superres": (masked_objective, "train_superres", "train_superres")}


def measure(config, row: str, knob: str, steps: int, scale: float, device) -> str:
    build, section, stage = ROWS[row]
    objective, make_batch = build(config, section, device)
    cfg = TrainConfig(**(getattr(config, stage).train.model_dump() | KNOBS[knob]))
    if cfg.activation_checkpointing:
        for m in objective.modules.values():
            checkpoint_blocks(m)
    optimizers = {k: make_optimizer(cfg, [objective.modules[m] for m in mods], device)
                  for k, mods in objective.optimizers.items()}
    batch = make_batch(scale)
    size = len(batch) if isinstance(batch, torch.Tensor) else len(next(iter(batch.values())))
    params = {k: [p for m in mods for p in objective.modules[m].parameters() if p.requires_grad]
              for k, mods in objective.optimizers.items()}

    def step():  # TrainLoop's step, one micro-batch: each optimizer's loss backward into its own parameters
        with autocast(device, cfg.precision):
            losses = objective.losses(batch, 10**9)
        for k, ps in params.items():
            if k in losses and losses[k].requires_grad:
                losses[k].backward(inputs=ps)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = seconds_per_call(step, steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    millions = sum(p.numel() for m in objective.modules.values() for p in m.parameters()) / 1e6
    return f"{row:10s} {knob:12s} batch {size:4d} ({millions:7.1f}M params): {size / seconds:8.1f} samples/s, " \
           f"peak {peak:6.1f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="muse-512")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--knobs", nargs="+", default=list(KNOBS), choices=list(KNOBS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply every preset micro-batch by this")
    args = p.parse_args()
    device, dtype = device_and_autocast()
    config = load_config(args.preset)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else float("nan")
    print(f"{args.preset} on {device} ({total:.0f} GiB), {'bf16 autocast' if dtype else 'fp32'}, eager", flush=True)
    for row in args.rows:
        for knob in args.knobs:
            try:
                print(measure(config, row, knob, args.steps, args.batch_scale, device), flush=True)
            except torch.OutOfMemoryError:
                print(f"{row:10s} {knob:12s} out of memory", flush=True)
            except UserError as e:
                print(f"{row:10s} {knob:12s} skipped: {e}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
