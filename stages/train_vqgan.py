"""Stage `train-vqgan`: the low-res and high-res image tokenizers and the scene tokenizer.

Each tokenizer trains through the shared loop (`muse.training`) from its own
`.work/KIND/VERSION/` checkpoint, so an interrupted run resumes exactly, and is
committed as its own artifact as soon as it is done (a later failure keeps it):

    vqgan-low   images at train_vqgan.low.resolution   (base transformer tokens)
    vqgan-high  images at train_vqgan.high.resolution  (super-res tokens, decoder finetuning)
    vqseg       one-hot scene label maps + the edge channel at train_vqgan.seg.resolution

Image tokenizers: L1 (+ L2) + LPIPS (with VGG weights) + codebook/commitment loss, and a
PatchGAN hinge loss with taming's adaptive weight from `disc_start`. The scene tokenizer:
cross-entropy over labels (face parts weighted up) + BCE on edges, no GAN. When `segments`
recorded no scene maps, `vqseg` records that too and holds no model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from muse.artifacts.store import PREVIEW_DIR, Artifact
from muse.config import (ConfigError, PipelineConfig, TrainConfig, VQLossConfig, VQModelConfig, WorkersConfig,
                         data_parallel_versioned)
from muse.datasets.decode import image_decoder, scene_decoder
from muse.datasets.labels import build_label_space, palette
from muse.datasets.segments import details as scene_details
from muse.datasets.segments import scene_maps_of
from muse.datasets.stream import batches, iter_tar, sample_stream
from muse.distributed import fit, rank_world, worker_device
from muse.models.image_loss import ImageLoss, lpips_status, perceptual_loss, psnr
from muse.models.vqgan import VQModel, from_pretrained, save_pretrained
from muse.stage import OutputSpec, StageContext
from muse.training import TrainLoop, WorkerJob, seeded

NAME = "train-vqgan"
INPUTS: tuple[str, ...] = ("shards", "segments")
OUTPUTS: tuple[str, ...] = ("vqgan-low", "vqgan-high", "vqseg")
CODE_VERSION = "2"

TOKENIZERS = {"vqgan-low": "low", "vqgan-high": "high", "vqseg": "seg"}  # output kind -> its config section

log = logging.getLogger("muse.stages.train_vqgan")


def config_of(config: PipelineConfig) -> dict:
    """The whole section, for the record; each output is versioned on its own part (`outputs`)."""
    return {"train_vqgan": config.train_vqgan.model_dump(mode="json"),
            "dataset_classes": list(config.segment.dataset_classes)}


def outputs(config: PipelineConfig, input_versions: dict[str, str]) -> dict[str, OutputSpec]:
    """Each tokenizer is versioned on what it reads: its own model knobs (those its quantizer and architecture
    read), its loop settings and losses, and its data, plus the artifact it warm-starts from (`init`), which its
    manifest then lists among its inputs. The image tokenizers read `shards` only, so re-segmenting or changing the
    scene tokenizer leaves them (and everything made from them) as they are."""
    c = config.train_vqgan

    def inputs(name: str, data: dict[str, str]) -> dict[str, str]:
        init = c.init[name] if name in c.init else None
        return data | ({init.partition(":")[0]: init.partition(":")[2]} if init else {})

    image = {"shards": input_versions["shards"]}
    specs = {kind: OutputSpec({"tokenizer": getattr(c, name).versioned(), "loss": c.loss.model_dump(mode="json"),
                               **data_parallel_versioned(c.train_for(name), c.workers)},
                              inputs(name, image))
             for kind, name in (("vqgan-low", "low"), ("vqgan-high", "high"))}
    specs["vqseg"] = OutputSpec({"tokenizer": c.seg.versioned(),
                                 **data_parallel_versioned(c.train_for("seg"), c.workers),
                                 "face_class_weight": c.face_class_weight,
                                 "dataset_classes": list(config.segment.dataset_classes)},
                                inputs("seg", {"segments": input_versions["segments"]}))
    return specs


def warm_start(ctx: StageContext, name: str, job: TokenizerJob) -> Path | None:
    """The weights file for `train_vqgan.init.<name>`, checked against the architecture `job` builds; None
    without."""
    c = ctx.config.train_vqgan
    if name not in c.init:
        return None
    key = f"train_vqgan.init.{name}"
    trained = from_pretrained(ctx.warm_start_artifact(key, c.init[name], job.kind).path)
    theirs, ours = trained.state_dict(), job.build().state_dict()
    differ = [f"{k} {tuple(theirs[k].shape) if k in theirs else 'missing'} != {tuple(v.shape)}"
              for k, v in ours.items() if k not in theirs or theirs[k].shape != v.shape]
    if differ or theirs.keys() != ours.keys():
        raise ConfigError(f"{key} {c.init[name]!r}: its architecture is not the one train_vqgan.{name} builds "
                          f"({'; '.join(differ[:3]) or 'other layers'}, theirs first)")
    path = job.work_dir / "init.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(path))
    return path


# ----------------------------------------------------------------------------- objectives


class ImageObjective:
    """Reconstruction + perceptual + codebook losses, and the PatchGAN game from `disc_start`."""

    def __init__(self, model: VQModel, loss: VQLossConfig, perceptual: nn.Module | None):
        self.model, self.image_loss = model, ImageLoss(loss, perceptual)
        self.modules: dict[str, nn.Module] = {"vq": model}
        self.optimizers = {"gen": ["vq"]}
        self.ema = ["vq"]
        self.image_loss.register(self.modules, self.optimizers)

    def losses(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        recon, codes, vq_loss = self.model(x)
        rec = self.image_loss.reconstruction(x, recon)
        adversarial, figures = self.image_loss.adversarial(x, recon, rec, self.model.last_layer, step)
        return {"rec": rec.detach(), "vq": vq_loss.detach(), "psnr": psnr(x, recon.detach()),
                "usage": torch.tensor(codes.unique().numel() / self.model.cfg.codebook_size), **figures,
                "gen": rec + vq_loss + adversarial}


class SceneObjective:
    """Cross-entropy over scene labels (face parts weighted up) + BCE on the edge channel + codebook loss."""

    def __init__(self, model: VQModel, class_weights: torch.Tensor):
        self.model, self.class_weights = model, class_weights
        self.modules: dict[str, nn.Module] = {"vq": model}
        self.optimizers = {"gen": ["vq"]}
        self.ema = ["vq"]

    def losses(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        logits, codes, vq_loss = self.model(x)
        labels = x[:, :-1].argmax(1)
        ce = F.cross_entropy(logits[:, :-1], labels, weight=self.class_weights.to(x.device))
        bce = F.binary_cross_entropy_with_logits(logits[:, -1], x[:, -1])
        acc = (logits[:, :-1].argmax(1) == labels).float().mean()
        return {"gen": ce + bce + vq_loss, "ce": ce.detach(), "bce": bce.detach(), "acc": acc,
                "usage": torch.tensor(codes.unique().numel() / self.model.cfg.codebook_size)}


# ----------------------------------------------------------------------------- evaluation and previews


def _val_batches(files: list[Path], decode, batch_size: int):
    buf = []
    for f in sorted(files):
        for _, sample in iter_tar(f):
            buf.append(decode(sample))
            if len(buf) == batch_size:
                yield torch.stack(buf)
                buf = []
    if buf:
        yield torch.stack(buf)


def _code_stats(counts: np.ndarray) -> dict[str, float]:
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {"codebook_usage": round(float((counts > 0).mean()), 4),
            "perplexity": round(float(np.exp(-(nz * np.log(nz)).sum())), 2)}


@torch.no_grad()
def evaluate(model: VQModel, files: list[Path], decode, batch_size: int, scene: bool, device) -> tuple[dict, tuple]:
    """Val metrics over every sample of `files`, and the first batch (inputs, reconstructions) for previews."""
    model.eval()
    counts = np.zeros(model.cfg.codebook_size, np.int64)
    sums, n, first = {}, 0, None
    for x in _val_batches(files, decode, batch_size):
        x = x.to(device)
        recon, codes, _ = model(x)
        counts += np.bincount(codes.flatten().cpu().numpy(), minlength=model.cfg.codebook_size)
        b = x.shape[0]
        if scene:
            labels = x[:, :-1].argmax(1)
            pred = recon[:, :-1].argmax(1)
            objects = labels > 0
            values = {"pixel_accuracy": (pred == labels).float().mean(),
                      "object_pixel_accuracy": (pred == labels)[objects].float().mean() if objects.any()
                      else torch.tensor(1.0)}
        else:
            values = {"psnr": psnr(x, recon.clamp(-1, 1)), "l1": (x - recon.clamp(-1, 1)).abs().mean()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b
        n += b
        first = first or (x[:8].cpu(), recon[:8].cpu())
    if n == 0:
        return {}, None
    return {**{k: round(v / n, 4) for k, v in sums.items()}, **_code_stats(counts), "val_samples": n}, first


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_preview(inputs: torch.Tensor, recon: torch.Tensor, path: Path, scene: bool) -> None:
    """Top row inputs, bottom row reconstructions (scene maps colourised)."""
    if scene:
        pal = palette(inputs.shape[1] - 1)
        top, bottom = pal[inputs[:, :-1].argmax(1).numpy()], pal[recon[:, :-1].argmax(1).numpy()]
    else:
        top, bottom = _to_uint8(inputs), _to_uint8(recon)
    grid = np.concatenate([np.concatenate(list(top), 1), np.concatenate(list(bottom), 1)], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


# ----------------------------------------------------------------------------- the stage




@dataclass
class TokenizerJob(WorkerJob):
    """Everything a tokenizer's training worker needs, picklable for Ray Train."""

    kind: str
    model_cfg: VQModelConfig
    train_cfg: TrainConfig
    loss_cfg: VQLossConfig
    channels: int  # in = out: 3 for images, labels + edge for the scene tokenizer
    train_files: list[Path]
    decode: Callable[[dict[str, bytes]], torch.Tensor]
    work_dir: Path
    class_weights: list[float] | None = None  # the scene tokenizer's cross-entropy weights; None = an image tokenizer
    init_weights: Path | None = None  # warm start: the weights training begins from; None = random

    def build(self) -> VQModel:
        """The untrained model, the same on every worker; built inside the process group, so its codebook
        all-reduces its EMA statistics and k-means samples over the workers."""
        with seeded(self.train_cfg.seed):
            return VQModel(self.model_cfg, self.channels, self.channels)


def fit_worker(job: TokenizerJob) -> dict:
    """Train on this worker's share of the train tars (rank-strided files); rank 0 saves the (EMA) weights."""
    rank, world = rank_world()
    device = worker_device()
    model = job.build()
    if job.init_weights is not None:  # before the loop copies it for EMA; a resumed checkpoint overrides both
        model.load_state_dict(load_file(str(job.init_weights)))
    if job.class_weights is None:
        objective = ImageObjective(model, job.loss_cfg, perceptual_loss(job.loss_cfg, device))
    else:
        objective = SceneObjective(model, torch.tensor(job.class_weights))
    for module in objective.modules.values():
        module.to(device)
    loop = TrainLoop(job.train_cfg, objective, job.work_dir, job.kind, device, rank=rank)
    cfg = job.train_cfg
    figures = loop.run(lambda position: batches(sample_stream(job.train_files, cfg.seed, position, cfg.shuffle_buffer,
                                                              rank, world, cfg.data_streams), cfg.batch_size,
                                                job.decode))
    loop.save_trained("vq")
    return {**figures, "steps": loop.step, "workers": world}


def _train_one(ctx: StageContext, job: TokenizerJob, data: Artifact, workers: WorkersConfig, extra: dict) -> Artifact:
    """Train tokenizer `job.kind` (in-process, or on Ray Train workers) and commit it with its val figures."""
    kind, scene, device = job.kind, job.class_weights is not None, ctx.device
    val_files = _tars(data, "val")
    figures = fit(fit_worker, job, workers, ctx.config.ray, job.work_dir)
    steps, world = int(figures.pop("steps")), int(figures.pop("workers"))
    model = job.build()
    model.load_state_dict(load_file(str(job.trained_path)))
    model.to(device)
    metrics, first = evaluate(model, val_files or job.train_files, job.decode, job.train_cfg.batch_size, scene, device)
    with ctx.commit(kind, figures) as out:
        save_pretrained(model, out.path, job.channels, job.channels, extra)
        if first is not None:
            save_preview(*first, out.path / PREVIEW_DIR / "reconstructions.png", scene)
        out.metrics = {**metrics, "steps": steps, "workers": world}
        out.details = {"resolution": job.model_cfg.resolution, "token_side": job.model_cfg.token_side,
                       "codebook_size": job.model_cfg.codebook_size, "val_split": "val" if val_files else "train",
                       **({} if scene else {"lpips": lpips_status(job.loss_cfg)}),
                       **({"init": init[TOKENIZERS[kind]]} if TOKENIZERS[kind] in (init := ctx.config.train_vqgan.init)
                          else {})}
    log.info("%s: val %s", kind, metrics)
    return out.artifact


def _tars(art: Artifact, split: str) -> list[Path]:
    return sorted((art.path / split).glob("*.tar"))


def run(ctx: StageContext) -> list[Artifact]:
    """Train and commit vqgan-low, vqgan-high and vqseg (each skipped if already committed at this version)."""
    config = ctx.config
    c = config.train_vqgan
    shards, segments = ctx.inputs["shards"], ctx.inputs["segments"]

    out = []
    for kind, tokenizer, model_cfg in (("vqgan-low", "low", c.low), ("vqgan-high", "high", c.high)):
        if (done := ctx.existing(kind)) is not None:
            out.append(done)
            continue
        job = TokenizerJob(kind, model_cfg, c.train_for(tokenizer), c.loss, 3, _tars(shards, "train"),
                           image_decoder(model_cfg.resolution), ctx.work_dir(kind))
        job.init_weights = warm_start(ctx, tokenizer, job)
        out.append(_train_one(ctx, job, shards, c.workers, {"input": "rgb in [-1, 1]"}))

    scene = scene_maps_of(segments)
    if (done := ctx.existing("vqseg")) is not None:
        out.append(done)
    elif not scene.present:
        with ctx.commit("vqseg") as art:
            art.metrics = {"steps": 0, "scene_maps": 0}
            art.details = scene_details(scene)
        log.info("vqseg: not trained: %s has no scene maps (%s)", segments.ref, scene.plan)
        out.append(art.artifact)
    else:
        space = build_label_space(config.segment.dataset_classes)
        weights = [c.face_class_weight if g == "face" else 1.0 for g in space.groups]
        job = TokenizerJob("vqseg", c.seg, c.train_for("seg"), c.loss, space.size + 1, _tars(segments, "train"),
                           scene_decoder(c.seg.resolution, space.size), ctx.work_dir("vqseg"), weights)
        job.init_weights = warm_start(ctx, "seg", job)
        out.append(_train_one(ctx, job, segments, c.workers,
                              {"input": "one-hot labels then edge", "label_space": space.to_json()}))
    return out
