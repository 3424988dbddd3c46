"""Stage `train-prior`: caption -> CLIP image embedding (unCLIP's prior), for `muse generate --prior`.

It trains `muse.models.prior` on the `tokens` rows: the pooled caption embedding in, the row's
`clip_image_emb` (from the run's `clip`) as the target, with the loss 1 - cosine through the
shared loop. The artifact reports the val loss beside the baseline that predicts the mean train
embedding for every caption: a prior that does not beat it has learned nothing of the captions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from muse.artifacts.store import Artifact
from muse.config import ConfigError, PipelineConfig, TextEncoderConfig, TrainConfig, data_parallel_versioned
from muse.contracts import TokensSchema
from muse.datasets.tokens import TokenTable, collate, token_batches
from muse.distributed import fit, rank_world, worker_device
from muse.models.prior import Prior, PriorSpec, save_prior
from muse.models.text import pooled_text
from muse.stage import StageContext
from muse.training import TrainLoop, WorkerJob, seeded
from muse.transformer_training import CaptionMemory

NAME = "train-prior"
INPUTS: tuple[str, ...] = ("tokens", "clip")
OUTPUTS: tuple[str, ...] = ("prior",)
CODE_VERSION = "1"
COLUMNS = ["text_emb", "text_len", "clip_image_emb"]
PRECOMPUTED = CaptionMemory(TextEncoderConfig(), precomputed=True, device=torch.device("cpu"))  # reads columns only

log = logging.getLogger("muse.stages.train_prior")


def enabled(config: PipelineConfig) -> bool:
    return config.train_prior.enabled


def config_of(config: PipelineConfig) -> dict:
    c = config.train_prior
    return c.model_dump(mode="json", exclude={"enabled", "train", "workers"}) | data_parallel_versioned(c.train,
                                                                                                       c.workers)


def pooled(batch: dict) -> torch.Tensor:
    """The batch's pooled caption embeddings, from its precomputed token states."""
    return pooled_text(*PRECOMPUTED(batch))


class PriorObjective:
    def __init__(self, prior: Prior):
        self.prior = prior
        self.modules = {"prior": prior}
        self.optimizers = {"loss": ["prior"]}
        self.ema: list[str] = []

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cos = F.cosine_similarity(self.prior(pooled(batch)), batch["clip_image_emb"], dim=-1)
        return {"loss": (1 - cos).mean(), "cosine": cos.mean().detach()}


@torch.no_grad()
def val_figures(prior: Prior, val: TokenTable, mean: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Val loss (1 - cosine) of the prior and of always predicting the mean train embedding."""
    prior.eval()
    ours, baseline, n = 0.0, 0.0, 0
    for start in range(0, len(val), 256):
        batch = collate([val[i] for i in range(start, min(start + 256, len(val)))])
        target = batch["clip_image_emb"].to(device)
        ours += float((1 - F.cosine_similarity(prior(pooled(batch).to(device)), target, dim=-1)).sum())
        baseline += float((1 - F.cosine_similarity(mean.expand_as(target), target, dim=-1)).sum())
        n += len(target)
    return {"val_loss": round(ours / n, 5), "val_loss_mean_embedding": round(baseline / n, 5), "val_rows": n}


@dataclass
class PriorJob(WorkerJob):
    """Everything a prior-training worker needs, picklable for Ray Train."""

    spec: PriorSpec
    train_cfg: TrainConfig
    tokens_path: Path
    work_dir: Path

    def build(self) -> Prior:
        with seeded(self.train_cfg.seed):
            return Prior(self.spec)


def fit_worker(job: PriorJob) -> dict:
    """Train on this worker's share of the rows (rank-strided row groups); rank 0 saves the (EMA) weights."""
    rank, world = rank_world()
    device = worker_device()
    prior = job.build().to(device)
    train = TokenTable(job.tokens_path, "train", COLUMNS)
    loop = TrainLoop(job.train_cfg, PriorObjective(prior), job.work_dir, "prior", device, rank=rank)
    bs, seed = job.train_cfg.batch_size, job.train_cfg.seed
    streams = job.train_cfg.data_streams
    figures = loop.run(lambda position: token_batches(train, bs, seed, position, rank, world, streams))
    loop.save_trained("prior")
    return {**figures, "steps": loop.step, "workers": world}


def run(ctx: StageContext) -> Artifact:
    """Train the prior (in-process, or on Ray Train workers) and commit the `prior` artifact."""
    c, device, tokens = ctx.config.train_prior, ctx.device, ctx.inputs["tokens"]
    schema = TokensSchema.of(tokens.path)
    if schema.image is None or schema.text is None:
        raise ConfigError(f"train-prior needs precomputed text and CLIP image embeddings; {tokens.ref} has "
                          f"{'no clip_image_emb (enable train_clip)' if schema.image is None else 'no text_emb'}")
    spec = PriorSpec(text_dim=schema.text.dim, image_dim=schema.image.dim, dim=c.dim, depth=c.depth)
    train = TokenTable(tokens.path, "train", COLUMNS)
    try:
        val = TokenTable(tokens.path, "val", COLUMNS)
    except FileNotFoundError:
        val = train
    mean = F.normalize(torch.from_numpy(train.column("clip_image_emb", len(train))).float().mean(0), dim=0).to(device)
    job = PriorJob(spec, c.train, tokens.path, ctx.work_dir("prior"))
    figures = fit(fit_worker, job, c.workers, ctx.config.ray, job.work_dir)
    steps, world = int(figures.pop("steps")), int(figures.pop("workers"))
    prior = job.build()
    prior.load_state_dict(load_file(str(job.trained_path)))
    prior.to(device)
    metrics = val_figures(prior, val, mean, device)
    with ctx.commit("prior", figures) as out:
        save_prior(prior, out.path, {"clip": schema.image.clip, "text_encoder":
                                     schema.text.encoder.model_dump(mode="json")})
        out.metrics = {**metrics, "steps": steps, "workers": world}
    log.info("prior: %s", metrics)
    return out.artifact
