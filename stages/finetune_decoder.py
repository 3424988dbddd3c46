"""Stage `finetune-decoder`: a larger decoder for the frozen high-res tokenizer (Muse, "Decoder Finetuning").

The new decoder has `extra_res_blocks` more ResBlocks per level and `channel_mult` times the
width; it starts from the trained decoder where shapes allow. The encoder, quant conv and
codebook stay frozen (no optimizer sees them, and their weights are checked bit-identical
at the end), so every image keeps its token ids and `tokens`, `base` and `superres` need
no retraining. Losses: L1 (+ L2) + LPIPS (with VGG weights) + PatchGAN hinge from
`disc_start`, on codes the frozen encoder computes on the fly from `shards` images, or, with
`superres_rows`, on super-res's own samples for those images (`muse.superres_codes`): the codes
the decoder is given in generation.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from muse.artifacts.store import PREVIEW_DIR, Artifact
from muse.config import ConfigError, PipelineConfig, TrainConfig, VQLossConfig, data_parallel_versioned
from muse.contracts import TransformerRecord
from muse.datasets.decode import image_decoder
from muse.datasets.shards import shard_files
from muse.datasets.stream import batches, iter_tar, sample_stream
from muse.distributed import fit, rank_world, worker_device
from muse.lora import load_trained
from muse.models.image_loss import ImageLoss, lpips_status, perceptual_loss, psnr
from muse.models.vqgan import (
    LatentDecoder,
    VQModel,
    from_pretrained,
    init_from,
    save_decoder,
)
from muse.stage import StageContext
from muse.superres_codes import pair_batches, write_pairs
from muse.training import TrainLoop, WorkerJob, seeded

NAME = "finetune-decoder"
INPUTS: tuple[str, ...] = ("shards", "vqgan-high", "tokens", "superres")
OUTPUTS: tuple[str, ...] = ("decoder",)
CODE_VERSION = "1"

log = logging.getLogger("muse.stages.finetune_decoder")


def inputs_of(config: PipelineConfig) -> tuple[str, ...]:
    """`tokens` and `superres` only when the decoder learns super-res's codes."""
    return INPUTS if config.finetune_decoder.superres_rows else INPUTS[:2]


def config_of(config: PipelineConfig) -> dict:
    """The decoder's shape, losses and the training knobs that change its weights (`superres_rows` when set, so
    the versions made before it was a knob stand)."""
    c = config.finetune_decoder
    skip = {"train", "workers"} | (set() if c.superres_rows else {"superres_rows"})
    return c.model_dump(mode="json", exclude=skip) | data_parallel_versioned(c.train, c.workers)


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

    def losses(self, batch: torch.Tensor | dict, step: int) -> dict[str, torch.Tensor]:
        """`batch`: images (their codes from the frozen encoder), or {"codes", "image"} pairs."""
        with torch.no_grad():
            if isinstance(batch, dict):
                x, side = batch["image"], self.tokenizer.cfg.token_side
                quantized = self.tokenizer.codes_to_latents(batch["codes"].view(-1, side, side))
            else:
                x = batch
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




@dataclass
class DecoderJob(WorkerJob):
    """Everything a decoder-finetuning worker needs, picklable for Ray Train."""

    tokenizer_path: Path  # the vqgan-high artifact whose decoder is replaced
    extra_res_blocks: int
    channel_mult: float
    loss_cfg: VQLossConfig
    train_cfg: TrainConfig
    train_files: list[Path]
    work_dir: Path
    pairs_path: Path | None = None  # super-res's codes and their images (`muse.superres_codes`); None = images only

    def build(self, tokenizer: VQModel) -> tuple[LatentDecoder, int]:
        """(the new decoder, started from the tokenizer's where shapes allow; tensors copied): the same on every
        worker."""
        with seeded(self.train_cfg.seed):
            decoder = LatentDecoder(tokenizer.cfg, 3, self.extra_res_blocks, self.channel_mult)
        return decoder, init_from(decoder, tokenizer)


def fit_worker(job: DecoderJob) -> dict:
    """Train on this worker's share of the train tars (rank-strided files); rank 0 saves the (EMA) decoder."""
    rank, world = rank_world()
    device = worker_device()
    tokenizer = from_pretrained(job.tokenizer_path).to(device)
    before = tokenizer_digest(tokenizer)
    decoder, _ = job.build(tokenizer)
    objective = DecoderObjective(tokenizer, decoder, job.loss_cfg, perceptual_loss(job.loss_cfg, device))
    for module in objective.modules.values():
        module.to(device)
    loop = TrainLoop(job.train_cfg, objective, job.work_dir, "decoder", device, rank=rank)
    cfg, decode = job.train_cfg, image_decoder(tokenizer.cfg.resolution)
    if job.pairs_path is not None:
        figures = loop.run(lambda position: pair_batches(job.pairs_path, cfg.batch_size, cfg.seed, position, rank,
                                                         world))
    else:
        figures = loop.run(lambda position: batches(sample_stream(job.train_files, cfg.seed, position,
                                                                  cfg.shuffle_buffer, rank, world, cfg.data_streams),
                                                    cfg.batch_size, decode))
    if tokenizer_digest(tokenizer) != before:
        raise RuntimeError("finetune-decoder changed the frozen encoder/codebook: token ids would no longer match")
    loop.save_trained("decoder")
    return {**figures, "steps": loop.step, "workers": world}


def run(ctx: StageContext) -> Artifact:
    """Finetune a larger decoder for `vqgan-high` (in-process, or on Ray Train workers) and commit it as
    `decoder`."""
    c, device = ctx.config.finetune_decoder, ctx.device
    shards, high = ctx.inputs["shards"], ctx.inputs["vqgan-high"]
    tokenizer = from_pretrained(high.path).to(device)
    before = tokenizer_digest(tokenizer)
    train_files = shard_files(shards.path, "train")
    val_files = shard_files(shards.path, "val") or train_files
    job = DecoderJob(high.path, c.extra_res_blocks, c.channel_mult, c.loss, c.train, train_files,
                     ctx.work_dir("decoder"))
    if c.superres_rows:
        made_for = TransformerRecord.of(ctx.inputs["superres"].path).tokenizers["tokens_high"]
        if made_for != high.ref:
            raise ConfigError(f"finetune_decoder.superres_rows: {ctx.inputs['superres'].ref} samples codes of "
                              f"{made_for}, not of this decoder's tokenizer {high.ref}")
        superres = load_trained(ctx.store, ctx.inputs["superres"]).to(device)
        job.pairs_path = job.work_dir / "superres-codes.npz"
        write_pairs(superres, ctx.inputs["superres"].path, ctx.inputs["tokens"].path, train_files,
                    image_decoder(tokenizer.cfg.resolution), c.superres_rows, c.train.seed, job.pairs_path, device)
        del superres
    trained, copied = job.build(tokenizer)
    log.info("finetune-decoder: %.2fM -> %.2fM decoder parameters, %d tensors initialised from vqgan-high",
             sum(p.numel() for n, p in tokenizer.named_parameters() if n.startswith(("decoder.", "post_quant")))
             / 1e6, sum(p.numel() for p in trained.parameters()) / 1e6, copied)
    figures = fit(fit_worker, job, c.workers, ctx.config.ray, job.work_dir)
    steps, world = int(figures.pop("steps")), int(figures.pop("workers"))
    trained.load_state_dict(load_file(str(job.trained_path)))
    trained.to(device)
    metrics, rows = compare(tokenizer, trained, val_files, tokenizer.cfg.resolution, device)
    with ctx.commit("decoder", figures) as out:
        save_decoder(trained, out.path, {"tokenizer": f"vqgan-high:{high.version}", "tokenizer_sha256": before})
        if rows:
            (out.path / PREVIEW_DIR).mkdir()
            Image.fromarray(np.concatenate(rows, 0)).save(out.path / PREVIEW_DIR / "input-old-new.png")
        out.metrics = {**metrics, "psnr_gain": round(metrics["new_psnr"] - metrics["old_psnr"], 4),
                       "steps": steps, "workers": world, "initialised_tensors": copied}
        out.details = {"lpips": lpips_status(c.loss)}
    log.info("finetune-decoder: val %s", metrics)
    return out.artifact
