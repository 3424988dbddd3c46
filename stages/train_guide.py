"""Stage `train-guide`: the head of mid-layer guidance, on the frozen base's own hidden states.

Each step masks the low-res token grids of a batch at rates drawn as the base trained
(arccos), runs the base up to the hooked block with the text hidden, and trains the head
(`muse.models.guide`) on those hidden states. The text is hidden so that the head has to
judge what the tokens show: with the caption in the memory it could read the caption back
and grade every image as matching it. Targets (`train_guide.target`): the caption
(contrastive over the batch; rows with the same caption count as matches), or a score or a
label from each sample's metadata JSON in `shards` (rows without the field are left out, and
counted). The artifact reports val accuracy (or R^2) at mask rates 0.5 and 0 beside chance;
its previews are the base's samples at each guide scale from the last checkpoints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from muse.artifacts.store import Artifact, MissingArtifact
from muse.config import (ConfigError, PipelineConfig, SamplerConfig, TextEncoderConfig, TrainConfig, TrainGuideConfig,
                         data_parallel_versioned)
from muse.contracts import TokensSchema, TransformerRecord
from muse.datasets.shards import metadata_value, shard_files
from muse.datasets.stream import iter_tar
from muse.datasets.tokens import TokenTable, collate, token_batches
from muse.guidance import features_at, steer
from muse.distributed import fit, rank_world, worker_device
from muse.lora import is_adapter, load_trained
from muse.masking import mask_tokens, sample_mask_rate
from muse.micro_conditions import of_batch
from muse.models.guide import GuideHead, GuideSpec, save_guide
from muse.models.text import pooled_text
from muse.models.transformer import MaskedTransformer, load_transformer, save_transformer
from muse.sample_grid import SampleGrid
from muse.stage import StageContext
from muse.training import TrainLoop, WorkerJob, seeded
from muse.transformer_training import CaptionMemory

NAME = "train-guide"
INPUTS: tuple[str, ...] = ("shards", "tokens", "base")
OUTPUTS: tuple[str, ...] = ("guide",)
CODE_VERSION = "1"

log = logging.getLogger("muse.stages.train_guide")


def enabled(config: PipelineConfig) -> bool:
    return config.train_guide.enabled


def config_of(config: PipelineConfig) -> dict:
    """The head, its target and the training knobs that change its weights."""
    c = config.train_guide
    return c.model_dump(mode="json", exclude={"enabled", "train", "workers"}) | data_parallel_versioned(c.train,
                                                                                                       c.workers)


def metadata_targets(shards: Artifact, c: TrainGuideConfig) -> tuple[dict[str, dict], dict]:
    """{split: {key: value}} of the field in every sample's metadata, and the spec fields the values fix
    (label classes, score bins). Errors name the shards artifact and the field."""
    values: dict[str, dict] = {}
    for split in ("train", "val"):
        values[split] = {}
        for path in shard_files(shards.path, split):
            for key, files in iter_tar(path):
                value = metadata_value(json.loads(files["json"]), c.field) if "json" in files else None
                if value is None:
                    continue
                if c.target == "score":
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                        raise ConfigError(f"{path}: sample {key}: train_guide.field {c.field!r} is {value!r}, "
                                          f"not a finite number (train_guide.target: score)")
                    value = float(value)
                elif isinstance(value, (dict, list)):
                    raise ConfigError(f"{path}: sample {key}: train_guide.field {c.field!r} is a "
                                      f"{type(value).__name__}, not a label")
                values[split][key] = value if c.target == "score" else str(value)
    train = list(values["train"].values())
    if not train:
        raise ConfigError(f"{shards.ref}: no train sample has the metadata field train_guide.field={c.field!r}")
    if c.target == "label":
        classes = tuple(sorted(set(train)))
        if len(classes) < 2:
            raise ConfigError(f"{shards.ref}: train_guide.field {c.field!r} has one value ({classes[0]!r}): "
                              f"nothing to tell apart")
        index = {name: i for i, name in enumerate(classes)}
        return {s: {k: index[v] for k, v in vs.items() if v in index} for s, vs in values.items()}, {"classes": classes}
    if not c.score_bins:
        mean, std = float(np.mean(train)), float(np.std(train)) or 1.0  # standardised: any unit trains alike
        return {s: {k: (v - mean) / std for k, v in vs.items()} for s, vs in values.items()}, {}
    edges = np.unique(np.quantile(train, np.linspace(0, 1, c.score_bins + 1)[1:-1]))
    binned = {s: {k: int(np.searchsorted(edges, v, side="right")) for k, v in vs.items()} for s, vs in values.items()}
    centres = [float(np.mean([values["train"][k] for k, b in binned["train"].items() if b == i] or [0.0]))
               for i in range(len(edges) + 1)]
    return binned, {"bin_edges": tuple(float(e) for e in edges), "bin_centres": tuple(centres)}


class GuideObjective:
    """The head's loss on the frozen base's hidden states of masked grids."""

    def __init__(self, base: MaskedTransformer, head: GuideHead, text: CaptionMemory,
                 targets: dict[str, float | int] | None, seed: int, rank: int = 0):
        self.base = base.eval().requires_grad_(False)
        self.head, self.text, self.targets = head, text, targets
        # mask rates and positions: this stage's own stream, another one on each further rank
        self.generator = torch.Generator().manual_seed(seed if rank == 0 else hash((seed, rank)) % 2**31)
        self.modules = {"guide": head}
        self.optimizers = {"loss": ["guide"]}
        self.ema: list[str] = []

    def features(self, batch: dict, rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of the hooked block for the masked grids, pooled caption embeddings)."""
        tokens = batch["tokens_low"]
        inputs, _ = mask_tokens(tokens, rate, self.base.spec.mask_id, self.generator)
        inputs = torch.where(rate.to(tokens.device)[:, None] > 0, inputs, tokens)  # mask_tokens hides one at least
        emb, mask = self.text(batch)
        with torch.no_grad():
            memory, memory_mask = self.base.memory(emb, torch.zeros_like(mask), None, None,  # text hidden: see the
                                                   of_batch(self.base, batch))              # docstring
            features = features_at(self.base, inputs, memory, memory_mask, self.head.spec.block)
        return features, pooled_text(emb, mask)

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        rate = sample_mask_rate(batch["tokens_low"].shape[0], self.generator)
        features, text = self.features(batch, rate)
        loss, hits, rows = guide_loss(self.head, features, text, batch, self.targets)
        regression = self.head.spec.target == "score" and not self.head.spec.bin_edges
        return {"loss": loss, ("mse" if regression else "accuracy"): hits / rows.clamp_min(1)}


def guide_loss(head: GuideHead, features: torch.Tensor, text: torch.Tensor, batch: dict,
               targets: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, right answers, rows graded) of one batch; for a regression score `right` is the summed squared
    error of the standardised value instead."""
    target = head.spec.target
    if target == "caption":
        captions = batch["caption"]
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float, device=features.device)
        logits = head.caption_logits(features, text)
        loss = (-(same / same.sum(1, keepdim=True)) * logits.log_softmax(1)).sum(1).mean() / 2 + \
               (-(same / same.sum(0, keepdim=True)) * logits.log_softmax(0)).sum(0).mean() / 2
        hits = same.gather(1, logits.argmax(1, keepdim=True)).sum()
        return loss, hits, torch.tensor(float(len(captions)), device=features.device)
    present = [k in targets for k in batch["key"]]
    keep = torch.tensor(present, device=features.device)
    values = [targets[k] if p else 0 for k, p in zip(batch["key"], present)]
    out = head(features)
    if target == "score" and not head.spec.bin_edges:
        y = torch.tensor(values, dtype=torch.float, device=features.device)
        err = (out[:, 0] - y).pow(2) * keep
        return err.sum() / keep.sum().clamp_min(1), err.sum().detach(), keep.sum().float()
    y = torch.tensor(values, dtype=torch.long, device=features.device)
    ce = F.cross_entropy(out, y, reduction="none") * keep
    hits = ((out.argmax(-1) == y) & keep).sum().float()
    return ce.sum() / keep.sum().clamp_min(1), hits, keep.sum().float()


@torch.no_grad()
def val_figures(objective: GuideObjective, table: TokenTable, seed: int) -> dict[str, float]:
    """Val accuracy (R^2 for a regression score) at mask rates 0.5 and 0, and chance, in batches of 64."""
    objective.head.eval()
    objective.generator.manual_seed(seed)
    spec = objective.head.spec
    keys = {table[i]["key"] for i in range(len(table))} if objective.targets is not None else set()
    out: dict[str, float] = {}
    for name, rate in (("val_accuracy", 0.5), ("val_accuracy_unmasked", 0.0)):
        hits = rows = 0.0
        chance = []
        for start in range(0, len(table), 64):
            batch = collate([table[i] for i in range(start, min(start + 64, len(table)))])
            batch = {k: v.to(objective.base.embed.row.device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            features, text = objective.features(batch, torch.full((len(batch["key"]),), rate))
            _, h, r = guide_loss(objective.head, features, text, batch, objective.targets)
            hits, rows = hits + float(h), rows + float(r)
            if spec.target == "caption":  # a random pick matches as often as the row's caption recurs in the batch
                caps = batch["caption"]
                chance.append((len(caps), sum(caps.count(a) for a in caps) / len(caps)))
        if spec.target == "score" and not spec.bin_edges:
            values = np.array([v for k, v in objective.targets.items() if k in keys])
            out[name.replace("accuracy", "r2")] = round(1 - hits / max(rows, 1) / max(float(values.var()), 1e-12), 4)
            continue
        out[name] = round(hits / max(rows, 1), 4)
    if spec.target == "caption":
        out["chance"] = round(sum(matches for _, matches in chance) / max(sum(n for n, _ in chance), 1), 4)
    elif spec.target == "label" or spec.bin_edges:
        counts = np.bincount([v for k, v in objective.targets.items() if k in keys])
        out["chance"] = round(float(counts.max() / max(counts.sum(), 1)), 4)  # always the most common answer
    return out


class GuidedGrid:
    """Checkpoint previews: the base's samples for fixed val captions at each guide scale (unguided first, then
    `evaluate.guide_scales`), one row a scale, over the real images' reconstructions. Caption guides steer each
    image to its caption, label guides to the image's own label, score guides up."""

    def __init__(self, grid: SampleGrid, base: MaskedTransformer, scales: list[float], targets: dict | None):
        self.grid, self.base, self.targets = grid, base, targets
        self.scales = sorted({0.0, *scales})

    def condition(self, head: GuideHead) -> torch.Tensor | None:
        batch = self.grid.batch
        if head.spec.target == "caption":
            return pooled_text(*self.grid.text(batch))
        if head.spec.target == "label":
            return torch.tensor([self.targets.get(k, 0) for k in batch["key"]], device=batch["tokens_low"].device)
        return None

    def __call__(self, head: GuideHead) -> np.ndarray:
        was_training = head.training
        head.eval()
        rows = []
        for scale in self.scales:
            with steer(self.base, head, self.condition(head), scale):
                grid = self.grid(self.base)
            rows.append(grid[: grid.shape[0] // 2])
        head.train(was_training)
        return self.grid.labelled(np.concatenate([*rows, grid[grid.shape[0] // 2:]], 0),
                                  [f"guide {scale:g}" for scale in self.scales] + ["real"])


@dataclass
class GuideJob(WorkerJob):
    """Everything a guide-training worker needs, picklable for Ray Train."""

    base_dir: Path  # a saved transformer: the base artifact, or its adapters merged into the work dir
    spec: GuideSpec
    text_cfg: TextEncoderConfig
    precomputed_text: bool
    targets: dict[str, float | int] | None
    train_cfg: TrainConfig
    tokens_path: Path
    columns: list[str]
    work_dir: Path
    preview: tuple[Path, SamplerConfig, list[float]] | None  # tokenizer, sampler, guide scales; None = no previews

    def build(self) -> GuideHead:
        with seeded(self.train_cfg.seed):
            return GuideHead(self.spec)


def fit_worker(job: GuideJob) -> dict:
    """Train on this worker's share of the rows (rank-strided row groups); rank 0 saves the head."""
    rank, world = rank_world()
    device = worker_device()
    base = load_transformer(job.base_dir)[0].to(device)
    text = CaptionMemory(job.text_cfg, job.precomputed_text, device)
    head = job.build().to(device)
    objective = GuideObjective(base, head, text, job.targets, job.train_cfg.seed, rank)
    loop = TrainLoop(job.train_cfg, objective, job.work_dir, "guide", device, rank=rank)
    train = TokenTable(job.tokens_path, "train", job.columns)
    preview = None
    if rank == 0 and job.preview is not None:
        tokenizer, sampler, scales = job.preview
        grid = GuidedGrid(SampleGrid(job.tokens_path, tokenizer, "tokens_low", None, text, device, sampler), base,
                          scales, job.targets)
        preview = lambda loop: grid(loop.trained("guide"))  # noqa: E731
    bs, seed = job.train_cfg.batch_size, job.train_cfg.seed
    streams = job.train_cfg.data_streams
    figures = loop.run(lambda position: token_batches(train, bs, seed, position, rank, world, streams), preview=preview)
    loop.save_trained("guide")
    return {**figures, "steps": loop.step, "workers": world}


def run(ctx: StageContext) -> Artifact:
    """Train the guide head of `base` (in-process, or on Ray Train workers) and commit the `guide` artifact."""
    config, inputs, device = ctx.config, ctx.inputs, ctx.device
    c = config.train_guide
    base_artifact, tokens = inputs["base"], inputs["tokens"]
    base = load_trained(ctx.store, base_artifact)
    if base.spec.cond_codebook_size:
        raise ConfigError(f"{base_artifact.ref}: train-guide guides a base transformer, not a super-res one")
    block = base.spec.depth // 2 if c.block is None else c.block
    if block >= base.spec.depth:
        raise ConfigError(f"train_guide.block {block}: {base_artifact.ref} has blocks 0..{base.spec.depth - 1}")
    text_info = TokensSchema.of(tokens.path).text
    record = TransformerRecord.of(base_artifact.path)
    targets, extra_spec = (None, {}) if c.target == "caption" else metadata_targets(inputs["shards"], c)
    spec = GuideSpec(feature_dim=base.spec.dim, block=block, target=c.target, dim=c.dim,
                     text_dim=base.spec.text_dim if c.target == "caption" else 0, **extra_spec)
    columns = ["key", "caption", "tokens_low", *(["text_emb", "text_len"] if text_info is not None else []),
               *(["micro_conds"] if base.spec.micro_conditions else [])]
    train = TokenTable(tokens.path, "train", columns)
    if targets is not None:
        log.info("train-guide: %s in %d of %d train rows' metadata", c.field, len(targets["train"]), len(train))
        targets = {**targets["train"], **targets["val"]}
    work_dir = ctx.work_dir("guide")
    base_dir = base_artifact.path
    if is_adapter(base_dir):  # workers load one saved model: the adapters merged in
        base_dir = work_dir / "frozen-base"
        save_transformer(base, base_dir)
    preview = None
    try:
        preview = (ctx.store.resolve(record.tokenizers["tokens_low"]).path, config.sampling.base,
                   list(config.evaluate.guide_scales))
    except MissingArtifact:  # tokens copied from another store: no previews
        log.warning("train-guide: no previews: tokenizer %s is not in this store", record.tokenizers["tokens_low"])
    job = GuideJob(base_dir, spec, record.text_encoder, text_info is not None, targets, c.train, tokens.path, columns,
                   work_dir, preview)
    log.info("train-guide: %s head on block %d of %s (%.2fM parameters)", c.target, block, base_artifact.manifest.label,
             sum(p.numel() for p in job.build().parameters()) / 1e6)
    figures = fit(fit_worker, job, c.workers, config.ray, work_dir)
    steps, world = int(figures.pop("steps")), int(figures.pop("workers"))
    head = job.build()
    head.load_state_dict(load_file(str(job.trained_path)))
    base.to(device)
    head.to(device)
    objective = GuideObjective(base, head, CaptionMemory(record.text_encoder, text_info is not None, device), targets,
                               c.train.seed)
    try:
        val = TokenTable(tokens.path, "val", columns)
    except FileNotFoundError:
        val = train
    metrics = val_figures(objective, val, c.train.seed)
    with ctx.commit("guide", figures, grids=4) as out:
        save_guide(head, out.path, {"base": base_artifact.ref, "field": c.field,
                                    "sampling": config.sampling.guide.model_dump(mode="json")})
        out.metrics = {**metrics, "steps": steps, "workers": world,
                       "parameters": sum(p.numel() for p in head.parameters())}
        out.details = {"spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__}}
    log.info("train-guide: %s", metrics)
    return out.artifact
