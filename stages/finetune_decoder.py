"""Stage `finetune-decoder`: a larger decoder for the frozen high-res tokenizer (Muse, "Decoder Finetuning").

The new decoder has `extra_res_blocks` more ResBlocks per level and `channel_mult` times the
width; it starts from the trained decoder where shapes allow. The encoder, quant conv and
codebook stay frozen (no optimizer sees them, and their weights are checked bit-identical
at the end), so every image keeps its token ids and `tokens`, `base` and `superres` need
no retraining. Losses: L1 (+ L2) + LPIPS (with VGG weights) + PatchGAN hinge from
`disc_start`, on codes the frozen encoder computes on the fly from `shards` images.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from muse.artifacts.store import PREVIEW_DIR, Artifact
from muse.config import PipelineConfig, VQLossConfig
from muse.datasets.decode import image_decoder
from muse.datasets.shards import shard_files
from muse.datasets.stream import batches, iter_tar, sample_stream
from muse.models.image_loss import ImageLoss, lpips_status, perceptual_loss, psnr
from muse.models.vqgan import (
    LatentDecoder,
    VQModel,
    from_pretrained,
    init_from,
    save_decoder,
)
from muse.stage import StageContext
from muse.training import TrainLoop, seed_everything

NAME = "finetune-decoder"
INPUTS: tuple[str, ...] = ("shards", "vqgan-high")
OUTPUTS: tuple[str, ...] = ("decoder",)
CODE_VERSION = "1"

log = logging.getLogger("muse.stages.finetune_decoder")


def config_of(config: PipelineConfig) -> dict:
    """The decoder's shape, losses and the training knobs that change its weights."""
    c = config.finetune_decoder
    return c.model_dump(mode="json") | {"train": c.train.versioned()}


def tokenizer_digest(model: VQModel) -> str:
    """sha256 over the encoder, quant conv and codebook tensors: what must not change."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.", "quantizer.")):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class DecoderObjective:
    """Reconstruct images from the frozen tokenizer's quantized latents with the new decoder."""

    def __init__(self, tokenizer: VQModel, decoder: LatentDecoder, loss: VQLossConfig, perceptual: nn.Module | None):
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.decoder, self.image_loss = decoder, ImageLoss(loss, perceptual)
        self.modules: dict[str, nn.Module] = {"decoder": decoder}
        self.optimizers = {"gen": ["decoder"]}
        self.ema = ["decoder"]
        self.image_loss.register(self.modules, self.optimizers)

    def losses(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            quantized, _, _ = self.tokenizer.encode(x)
        recon = self.decoder(quantized)
        rec = self.image_loss.reconstruction(x, recon)
        adversarial, figures = self.image_loss.adversarial(x, recon, rec, self.decoder.last_layer, step)
        return {"rec": rec.detach(), "psnr": psnr(x, recon.detach()), **figures, "gen": rec + adversarial}


@torch.no_grad()
def compare(tokenizer: VQModel, decoder: LatentDecoder, files: list[Path], resolution: int, device,
            batch_size: int = 32) -> tuple[dict[str, float], list[np.ndarray]]:
    """Val PSNR/L1 of the old and new decoders on the same codes; preview rows input | old | new."""
    decode = image_decoder(resolution)
    decoder.eval()
    sums = {"old_psnr": 0.0, "new_psnr": 0.0, "old_l1": 0.0, "new_l1": 0.0}
    n, rows, buf = 0, [], []
    samples = [decode(files_) for f in files for _, files_ in iter_tar(f)]
    for start in range(0, len(samples), batch_size):
        x = torch.stack(samples[start:start + batch_size]).to(device)
        buf.append(x)
        quantized, _, _ = tokenizer.encode(x)
        old, new = tokenizer.decode(quantized).clamp(-1, 1), decoder(quantized).clamp(-1, 1)
        b = x.shape[0]
        sums["old_psnr"] += float(psnr(x, old)) * b
        sums["new_psnr"] += float(psnr(x, new)) * b
        sums["old_l1"] += float((x - old).abs().mean()) * b
        sums["new_l1"] += float((x - new).abs().mean()) * b
        n += b
        if not rows:
            to8 = lambda t: ((t[:8] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
            rows = [np.concatenate(list(to8(t)), 1) for t in (x, old, new)]
    return {k: round(v / max(n, 1), 4) for k, v in sums.items()} | {"val_samples": n}, rows


def run(ctx: StageContext) -> Artifact:
    """Finetune a larger decoder for `vqgan-high` and commit it as `decoder`."""
    c, device = ctx.config.finetune_decoder, ctx.device
    shards, high = ctx.inputs["shards"], ctx.inputs["vqgan-high"]
    tokenizer = from_pretrained(high.path).to(device)
    before = tokenizer_digest(tokenizer)
    seed_everything(c.train.seed)
    decoder = LatentDecoder(tokenizer.cfg, 3, c.extra_res_blocks, c.channel_mult).to(device)
    copied = init_from(decoder, tokenizer)
    objective = DecoderObjective(tokenizer, decoder, c.loss, perceptual_loss(c.loss, device))
    for module in objective.modules.values():
        module.to(device)
    log.info("finetune-decoder: %.2fM -> %.2fM decoder parameters, %d tensors initialised from vqgan-high",
             sum(p.numel() for n, p in tokenizer.named_parameters() if n.startswith(("decoder.", "post_quant")))
             / 1e6, sum(p.numel() for p in decoder.parameters()) / 1e6, copied)
    train_files = shard_files(shards.path, "train")
    val_files = shard_files(shards.path, "val") or train_files
    loop = TrainLoop(c.train, objective, ctx.work_dir("decoder"), "decoder", device)
    decode = image_decoder(tokenizer.cfg.resolution)
    figures = loop.run(lambda position: batches(sample_stream(train_files, c.train.seed, position, c.train.shuffle_buffer),
                                                c.train.batch_size, decode))
    trained = loop.trained("decoder")
    if tokenizer_digest(tokenizer) != before:
        raise RuntimeError("finetune-decoder changed the frozen encoder/codebook: token ids would no longer match")
    metrics, rows = compare(tokenizer, trained, val_files, tokenizer.cfg.resolution, device)
    with ctx.commit("decoder", figures) as out:
        save_decoder(trained, out.path, {"tokenizer": f"vqgan-high:{high.version}", "tokenizer_sha256": before})
        if rows:
            (out.path / PREVIEW_DIR).mkdir()
            Image.fromarray(np.concatenate(rows, 0)).save(out.path / PREVIEW_DIR / "input-old-new.png")
        out.metrics = {**metrics, "psnr_gain": round(metrics["new_psnr"] - metrics["old_psnr"], 4),
                       "steps": loop.step, "initialised_tensors": copied}
        out.details = {"lpips": lpips_status(c.loss)}
    log.info("finetune-decoder: val %s", metrics)
    return out.artifact
