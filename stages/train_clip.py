"""Stage `train-clip`: a CLIP on the user's own image-caption pairs, for CLIP latents and a meaningful CLIP score.

An open_clip model (`muse.models.clip`, sized by `train_clip.model`, or pretrained weights
by tag or path) trains contrastively with open_clip's `ClipLoss` through the shared loop on
the `shards` pairs; `freeze` commits pretrained weights untrained. The artifact reports
zero-shot retrieval on val, image -> text and text -> image recall at 1 and 5, beside what
random rankings would score. A caption shared by several images counts as a hit for each of
them, and the chance figures account for it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from muse.artifacts.store import Artifact
from muse.config import ClipArchConfig, PipelineConfig, TrainConfig, data_parallel_versioned
from muse.datasets.decode import image_bytes, image_tensor
from muse.datasets.shards import shard_files
from muse.datasets.stream import iter_tar, sample_stream
from muse.distributed import fit, rank_world, worker_device
from muse.models.clip import Clip, save_clip
from muse.stage import StageContext
from muse.training import TrainLoop, WorkerJob, seeded

NAME = "train-clip"
INPUTS: tuple[str, ...] = ("shards",)
OUTPUTS: tuple[str, ...] = ("clip",)
CODE_VERSION = "1"
RECALL_AT = (1, 5)

log = logging.getLogger("muse.stages.train_clip")


def enabled(config: PipelineConfig) -> bool:
    """In full-train when asked for, or when the base is conditioned on CLIP image embeddings."""
    return config.trains_clip


def config_of(config: PipelineConfig) -> dict:
    c = config.train_clip
    return c.model_dump(mode="json", exclude={"enabled", "train", "workers"}) | data_parallel_versioned(c.train,
                                                                                                       c.workers)


class ClipObjective:
    """Symmetric InfoNCE over the batch (open_clip's ClipLoss) at the model's learned temperature. On several
    workers every rank contrasts the union batch: features are all-gathered with their gradients, so the
    averaged gradient is the one-worker gradient of the union batch."""

    def __init__(self, clip: Clip):
        from open_clip.loss import ClipLoss

        rank, world = rank_world()
        self.clip = clip
        self.loss = ClipLoss(gather_with_grad=world > 1, rank=rank, world_size=world)
        self.modules = {"clip": clip}
        self.optimizers = {"loss": ["clip"]}
        self.ema: list[str] = []

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        images = self.clip.encode_images(batch["image"])
        texts = self.clip.encode_tokens(batch["tokens"])
        scale = self.clip.logit_scale.exp().clamp(max=100)  # open_clip clamps it at 100 too
        loss = self.loss(images, texts, scale)
        with torch.no_grad():
            hits = (images @ texts.T).argmax(1) == torch.arange(len(images), device=images.device)
        return {"loss": loss, "batch_i2t_acc": hits.float().mean(), "logit_scale": scale.detach()}


def pairs(files: list[Path], clip: Clip, batch_size: int, seed: int, position: int,
          shuffle_buffer: int, rank: int = 0, world: int = 1, streams: int | None = None) -> Iterator[dict]:
    """Endless shuffled batches {image [B, 3, S, S] in [-1, 1], tokens [B, context]} from this rank's shard tars."""
    stream = sample_stream(files, seed, position, shuffle_buffer, rank, world, streams)
    while True:
        samples = [next(stream)[1] for _ in range(batch_size)]
        yield {"image": torch.stack([image_tensor(image_bytes(s), clip.image_size) for s in samples]),
               "tokens": clip.tokens([s["txt"].decode("utf-8").strip() for s in samples])}


def _hit_chance(n: int, same: int, k: int) -> float:
    """P(at least one of `same` right items among k drawn from n without replacement)."""
    if same == 0:
        return 0.0
    return 1 - math.comb(n - same, k) / math.comb(n, k) if k <= n - same else 1.0


@torch.no_grad()
def retrieval(clip: Clip, files: list[Path], batch_size: int, device: torch.device) -> dict[str, float]:
    """Recall at 1 and 5 of val images -> their caption among the unique captions, and captions -> one of their
    images among all images, with what a random ranking would score."""
    clip.eval()
    images, captions = [], []
    for f in files:
        for _, s in iter_tar(f):
            images.append(image_tensor(image_bytes(s), clip.image_size))
            captions.append(s["txt"].decode("utf-8").strip())
    if not images:
        return {}
    unique = sorted(set(captions))
    image_emb = torch.cat([clip.encode_images(torch.stack(images[i:i + batch_size]).to(device))
                           for i in range(0, len(images), batch_size)])
    text_emb = torch.cat([clip.encode_captions(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)])
    sims = (image_emb @ text_emb.T).cpu()  # [images, unique captions]
    truth = torch.tensor([unique.index(c) for c in captions])
    counts = np.bincount(truth.numpy(), minlength=len(unique))
    out: dict[str, float] = {"val_images": len(images), "val_captions": len(unique)}
    for k in RECALL_AT:
        i2t = (sims.topk(min(k, len(unique)), 1).indices == truth[:, None]).any(1).float().mean()
        t2i = torch.tensor([(truth[sims[:, j].topk(min(k, len(images))).indices] == j).any() for j in range(len(unique))])
        out[f"i2t_r{k}"] = round(float(i2t), 4)
        out[f"t2i_r{k}"] = round(float(t2i.float().mean()), 4)
        out[f"i2t_r{k}_chance"] = round(min(k, len(unique)) / len(unique), 4)
        out[f"t2i_r{k}_chance"] = round(float(np.mean([_hit_chance(len(images), int(m), k) for m in counts])), 4)
    return out


@dataclass
class ClipJob(WorkerJob):
    """Everything a CLIP-training worker needs, picklable for Ray Train."""

    model_cfg: ClipArchConfig
    pretrained: str | None
    train_cfg: TrainConfig
    train_files: list[Path]
    work_dir: Path

    def build(self) -> Clip:
        """The initial CLIP (seeded random or pretrained): the same on every worker."""
        with seeded(self.train_cfg.seed):
            return Clip(self.model_cfg, self.pretrained)


def fit_worker(job: ClipJob) -> dict:
    """Train on this worker's share of the train tars (rank-strided files); rank 0 saves the (EMA) weights."""
    rank, world = rank_world()
    device = worker_device()
    clip = job.build().to(device)
    loop = TrainLoop(job.train_cfg, ClipObjective(clip), job.work_dir, "clip", device, rank=rank)
    if rank == 0:
        log.info("clip: %.2fM parameters, image %d px, context %d, %d worker(s)",
                 sum(p.numel() for p in clip.parameters()) / 1e6, clip.image_size, clip.context_length, world)
    cfg = job.train_cfg
    figures = loop.run(lambda position: pairs(job.train_files, clip, cfg.batch_size, cfg.seed, position,
                                              cfg.shuffle_buffer, rank, world, cfg.data_streams))
    loop.save_trained("clip")
    return {**figures, "steps": loop.step, "workers": world}


def run(ctx: StageContext) -> Artifact:
    """Train (in-process, or on Ray Train workers) or take pretrained the CLIP and commit the `clip` artifact with
    its val retrieval figures."""
    c, device = ctx.config.train_clip, ctx.device
    shards = ctx.inputs["shards"]
    train_files, val_files = shard_files(shards.path, "train"), shard_files(shards.path, "val")
    job = ClipJob(c.model, c.pretrained, c.train, train_files, ctx.work_dir("clip"))
    figures, steps, world = None, 0, 1
    if not c.freeze:
        figures = fit(fit_worker, job, c.workers, ctx.config.ray, job.work_dir)
        steps, world = int(figures.pop("steps")), int(figures.pop("workers"))
    clip = job.build()
    if not c.freeze:
        clip.load_state_dict(load_file(str(job.trained_path)))
    clip.to(device)
    metrics = retrieval(clip, val_files or train_files, c.train.batch_size, device)
    with ctx.commit("clip", figures) as out:
        save_clip(clip, out.path, {"pretrained": c.pretrained})
        out.metrics = {**metrics, "steps": steps, "workers": world, "dim": clip.dim}
        out.details = {"val_split": "val" if val_files else "train", "pretrained": c.pretrained,
                       "frozen": c.freeze}
    log.info("clip: %s", metrics)
    return out.artifact
