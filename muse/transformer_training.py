"""Training a masked transformer (base or super-res) on the `tokens` artifact with the shared loop.

The objective masks a random fraction r of the target tokens per sample (r from `mask_rate`'s
distribution, `muse.masking`), drops the text (hides it in the memory) for `text_drop_rate` of samples, and
takes cross-entropy on the masked positions only (with `edge_weight`, a weighted mean in which
outline tokens count more; with `code_smoothing`, against targets spread over nearby codes). It
logs accuracy on masked tokens and the loss per mask-rate bucket (low / mid / high r), the
figures that say whether the model learns to fill in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from muse.artifacts.store import Artifact, ArtifactStore, MissingArtifact
from muse.code_smoothing import CodeSmoothing
from muse.config import (
    ConfigError,
    LoraConfig,
    MaskedTransformerStageConfig,
    PipelineConfig,
    SamplerConfig,
    TextEncoderConfig,
    TrainConfig,
    data_parallel_versioned,
)
from muse.contracts import TokenGeometry, TokensSchema, TransformerRecord
from muse.datasets.tokens import TokenTable, collate, token_batches
from muse.distributed import fit, rank_world, worker_device, wrap_ddp
from muse.edge_weights import EdgeWeights
from muse.lora import apply_lora, load_trained, save_adapter
from muse.masking import MASK_RATES, mask_tokens, sample_mask_rate
from muse.micro_conditions import medians
from muse.micro_conditions import of_batch as micro_of
from muse.models.transformer import MaskedTransformer, TransformerSpec, save_transformer
from muse.models.vqgan import from_pretrained
from muse.sample_grid import SampleGrid
from muse.stage import OutputSpec, StageContext
from muse.training import TrainLoop, WorkerJob, seeded

log = logging.getLogger("muse.transformer_training")
RATE_BUCKETS = ((0.0, 0.4), (0.4, 0.8), (0.8, 1.01))
MAX_GRIDS = 4  # sample grids (the last checkpoints') copied into the artifact's previews
MICRO_DEFAULT_ROWS = 100_000  # train rows whose micro-condition medians become generation's defaults


class CaptionMemory:
    """Text embeddings of a batch: the precomputed columns, or the text encoder run on the captions."""

    def __init__(self, encoder_cfg: TextEncoderConfig, precomputed: bool, device: torch.device):
        self.encoder = None
        if not precomputed:
            from muse.models.text import load_text_encoder

            self.encoder = load_text_encoder(encoder_cfg, device)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            emb = batch["text_emb"]
            mask = torch.arange(emb.shape[1], device=emb.device)[None] < batch["text_len"][:, None]
            return emb, mask
        emb, mask = self.encoder.encode(batch["caption"])
        return emb.to(batch["tokens_low"].device), mask.to(batch["tokens_low"].device)


class MaskedLM(nn.Module):
    """memory + forward as one module, so DDP sees a single forward whose backward averages every gradient."""

    def __init__(self, model: MaskedTransformer):
        super().__init__()
        self.model = model

    def forward(self, inputs, text_emb, text_mask, cond_tokens, scene_tokens, micro=None, image_emb=None,
                image_mask=None) -> torch.Tensor:
        memory, memory_mask = self.model.memory(text_emb, text_mask, cond_tokens, scene_tokens, micro, image_emb,
                                                image_mask)
        return self.model(inputs, memory, memory_mask)


class MaskedObjective:
    """Masked-token cross-entropy with text dropout (and the low-res condition for super-res)."""

    def __init__(self, model: MaskedTransformer, target: str, text: CaptionMemory, text_drop_rate: float,
                 label_smoothing: float, cond: str | None, scene_drop_rate: float = 0.0, seed: int = 0,
                 image_drop_rate: float = 0.0, edge_weights: EdgeWeights | None = None,
                 code_smoothing: CodeSmoothing | None = None, mask_rate: str = MASK_RATES[0]):
        self.model, self.target, self.text, self.cond = model, target, text, cond
        self.mask_rate = mask_rate  # the distribution each sample's mask rate is drawn from (`muse.masking`)
        self.edge_weights = edge_weights  # per-token loss weights of the target grids; None = all 1
        self.code_smoothing = code_smoothing  # targets spread over nearby codes; None = one-hot
        self.generator = torch.Generator().manual_seed(seed)  # masks and dropout: this stage's own stream
        self.text_drop_rate, self.label_smoothing = text_drop_rate, label_smoothing
        self.scene_drop_rate, self.image_drop_rate = scene_drop_rate, image_drop_rate
        self.forward = wrap_ddp(MaskedLM(model))  # DDP inside a Ray Train process group, plain otherwise
        self.averages_gradients = True  # DDP's backward does it (a plain module has one worker's to average)
        self.modules: dict[str, nn.Module] = {"transformer": model}
        self.optimizers = {"loss": ["transformer"]}
        self.ema = ["transformer"]
        self.memory_len = 0  # of the last batch: sets the attention FLOPs

    def rate_figures(self, samples_per_s: float) -> dict[str, float]:
        """Image tokens/s and training FLOP/s (6 x matmul parameters + attention, per token)."""
        tokens = samples_per_s * self.model.spec.side ** 2
        return {"tokens_per_s": tokens, "flops_per_s": tokens * self.model.flops_per_token(self.memory_len)}

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        tokens = batch[self.target]
        b = tokens.shape[0]
        # on the host: the rate buckets below then need no device sync
        rate = sample_mask_rate(b, self.generator, distribution=self.mask_rate)
        inputs, mask = mask_tokens(tokens, rate, self.model.spec.mask_id, self.generator)
        emb, text_mask = self.text(batch)
        keep = (torch.rand(b, generator=self.generator) >= self.text_drop_rate).to(tokens.device)
        scene = batch.get("seg_tokens") if self.model.spec.scene_codebook_size else None
        if scene is not None:  # -1 hides the scene: the model learns text-only generation too
            hidden = (torch.rand(b, generator=self.generator) < self.scene_drop_rate).to(tokens.device)
            scene = scene.masked_fill(hidden[:, None], -1)
        image = batch["clip_image_emb"] if self.model.spec.image_dim else None
        image_keep = None  # drawn only when used: models without an image token keep their random stream
        if image is not None:
            image_keep = (torch.rand(b, generator=self.generator) >= self.image_drop_rate).to(tokens.device)
        logits = self.forward(inputs, emb, text_mask & keep[:, None], batch[self.cond] if self.cond else None, scene,
                              micro_of(self.model, batch), image, image_keep)
        spec = self.model.spec
        self.memory_len = 1 + emb.shape[1] + (spec.cond_side ** 2 if self.cond else 0) + \
            (spec.scene_side ** 2 if scene is not None else 0) + (1 if spec.global_width else 0) + \
            (1 if spec.image_dim else 0)
        if self.code_smoothing is None:
            per_token = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none",
                                        label_smoothing=self.label_smoothing)
        else:
            per_token = self.code_smoothing(logits, tokens, self.label_smoothing)
        weights = mask.float() if self.edge_weights is None else mask * self.edge_weights(tokens)
        loss = (per_token * weights).sum() / weights.sum()
        with torch.no_grad():
            acc = ((logits.argmax(-1) == tokens) & mask).sum() / mask.sum()
            per_sample = (per_token * mask).sum(1) / mask.sum(1)
            out = {"loss": loss, "masked_acc": acc}
            for lo, hi in RATE_BUCKETS:
                sel = (rate >= lo) & (rate < hi)
                if sel.any():  # a weighted sum: indexing by a mask would wait for the device
                    weights = (sel.float() / sel.sum()).to(tokens.device)
                    out[f"loss_r{lo:.1f}-{min(hi, 1.0):.1f}"] = (per_sample * weights).sum()
        return out


@torch.no_grad()
def masked_accuracy(model: MaskedTransformer, table: TokenTable, target: str, text: CaptionMemory,
                    cond: str | None, device: torch.device, rate: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Val figures at a fixed mask rate: accuracy on masked tokens with and without the text, and chance."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    hits = {"text": 0, "no_text": 0}
    total = 0
    for start in range(0, len(table), 64):
        batch = collate([table[i] for i in range(start, min(start + 64, len(table)))])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        tokens = batch[target]
        inputs, mask = mask_tokens(tokens, torch.full((tokens.shape[0],), rate), model.spec.mask_id, gen)
        emb, text_mask = text(batch)
        for name, tm in (("text", text_mask), ("no_text", torch.zeros_like(text_mask))):
            memory, memory_mask = model.memory(emb, tm, batch[cond] if cond else None,
                                               batch.get("seg_tokens") if model.spec.scene_codebook_size else None,
                                               micro_of(model, batch),
                                               batch["clip_image_emb"] if model.spec.image_dim else None)
            pred = model(inputs, memory, memory_mask).argmax(-1)
            hits[name] += int(((pred == tokens) & mask).sum())
        total += int(mask.sum())
    return {"val_masked_acc": round(hits["text"] / max(total, 1), 4),
            "val_masked_acc_no_text": round(hits["no_text"] / max(total, 1), 4),
            "chance": round(1 / model.spec.codebook_size, 5)}


@dataclass
class TransformerJob(WorkerJob):
    """Everything a training worker needs, picklable for Ray Train."""

    kind: str
    spec: TransformerSpec
    train_cfg: TrainConfig
    text_cfg: TextEncoderConfig
    precomputed_text: bool
    tokens_path: Path
    columns: list[str]
    target: str
    cond: str | None
    text_drop_rate: float
    label_smoothing: float
    scene_drop_rate: float
    image_drop_rate: float
    work_dir: Path
    tokenizer_path: Path | None  # decodes the sample grids written at checkpoints; None = no grids
    sampler: SamplerConfig  # this model's sampling pass: the sample grids, and the default recorded for generation
    init_weights: Path | None = None  # warm start: the weights training begins from; None = random
    edge_weight: float = 1.0  # loss weight of outline tokens (decoded by tokenizer_path); 1 = none
    code_smoothing: float = 0.0  # target share on the codes near each target in tokenizer_path's latents
    mask_rate: str = MASK_RATES[0]  # the training mask rate's distribution (`muse.masking`)
    lora: LoraConfig | None = None  # train adapters on the init weights, the rest frozen; None = every weight


def fit_worker(job: TransformerJob) -> dict:
    """Train on this worker's shard of the rows (rank-strided row groups); rank 0 saves the (EMA) weights."""
    rank, world = rank_world()
    device = worker_device()
    with seeded(job.train_cfg.seed):  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = MaskedTransformer(job.spec).to(device)
    if job.init_weights is not None:  # before the loop copies it for EMA; a resumed checkpoint overrides both
        model.load_state_dict(load_file(str(job.init_weights)))
    if job.lora is not None:
        apply_lora(model, job.lora)
    text = CaptionMemory(job.text_cfg, job.precomputed_text, device)
    edges = smoothing = None
    if job.edge_weight != 1 or job.code_smoothing:
        tokenizer = from_pretrained(job.tokenizer_path).to(device)
        edges = EdgeWeights(tokenizer, job.edge_weight) if job.edge_weight != 1 else None
        smoothing = CodeSmoothing(tokenizer, job.code_smoothing) if job.code_smoothing else None
    objective = MaskedObjective(model, job.target, text, job.text_drop_rate, job.label_smoothing, job.cond,
                                job.scene_drop_rate, job.train_cfg.seed, job.image_drop_rate, edges, smoothing,
                                job.mask_rate)
    train = TokenTable(job.tokens_path, "train", job.columns)
    loop = TrainLoop(job.train_cfg, objective, job.work_dir, job.kind, device, rank=rank)
    if rank == 0:
        log.info("%s: %.2fM parameters (%.3fM trained), %d train rows, tokens %dx%d, %d worker(s)", job.kind,
                 sum(p.numel() for p in model.parameters()) / 1e6,
                 sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, len(train), job.spec.side,
                 job.spec.side, world)
    bs, seed = job.train_cfg.batch_size, job.train_cfg.seed
    preview = None
    if rank == 0 and job.tokenizer_path is not None:
        grid = SampleGrid(job.tokens_path, job.tokenizer_path, job.target, job.cond, text, device, job.sampler)
        preview = lambda loop: grid.labelled(grid(loop.trained("transformer")))  # noqa: E731
    streams = job.train_cfg.data_streams
    figures = loop.run(lambda position: token_batches(train, bs, seed, position, rank, world, streams), preview=preview)
    loop.save_trained("transformer")
    trained_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)  # what the optimizer updates
    return {**figures, "steps": loop.step, "workers": world, "trained_parameters": trained_parameters}


def transformer_spec(model_cfg, geometry: dict[str, TokenGeometry], text_dim: int, target: str, cond: str | None,
                     scene: bool, image_dim: int = 0) -> TransformerSpec:
    """The architecture for `target` tokens (conditioned on `cond` tokens for super-res) from the tokens
    schema's geometry: grid sides, codebook sizes, and the fsq levels of FSQ low-res ids."""
    return TransformerSpec(
        dim=model_cfg.dim, depth=model_cfg.depth, heads=model_cfg.heads,
        codebook_size=geometry[target].codebook_size, side=geometry[target].side, text_dim=text_dim,
        cond_codebook_size=geometry[cond].codebook_size if cond else 0,
        cond_levels=tuple(geometry[cond].fsq_levels) if cond else (),
        cond_side=geometry[cond].side if cond else 0, cond_depth=model_cfg.cond_depth,
        cond_aligned=bool(cond) and model_cfg.cond_aligned,
        cond_upsample=model_cfg.cond_upsample if cond else "nearest",
        scene_codebook_size=geometry["seg_tokens"].codebook_size if scene else 0,
        scene_side=geometry["seg_tokens"].side if scene else 0,
        pooled_text=model_cfg.pooled_text, micro_conditions=tuple(model_cfg.micro_conditions), image_dim=image_dim,
        patch=model_cfg.patch)


def stage_config(config: PipelineConfig, section: str) -> dict:
    """What a masked-transformer stage's version hashes: its section (the training knobs that change the weights)
    and the text encoder when embeddings are computed at training time; not the sampler pass the model records
    for generation (it changes no weight), nor the warm start, which `masked_outputs` hashes as an input."""
    c: MaskedTransformerStageConfig = getattr(config, section)
    return {section: c.model_dump(mode="json", exclude={"init", "train", "workers"}) |
            data_parallel_versioned(c.train, c.workers),
            "text_encoder": config.tokenize.text_encoder.model_dump(mode="json")}


def masked_outputs(config: PipelineConfig, input_versions: dict[str, str], section: str,
                   kind: str) -> dict[str, OutputSpec]:
    """A masked-transformer stage's one output: versioned on `stage_config` and its inputs, plus the artifact it
    warm-starts from (`<section>.init`), which its manifest then lists among its inputs (the lineage)."""
    init = getattr(config, section).init
    inputs = dict(input_versions) | ({init.partition(":")[0]: init.partition(":")[2]} if init else {})
    return {kind: OutputSpec(stage_config(config, section), inputs)}


def warm_start(ctx: StageContext, section: str, kind: str, spec: TransformerSpec) -> Path | None:
    """The weights file `<section>.init` names, checked against the architecture this run builds; None without."""
    ref = getattr(ctx.config, section).init
    if ref is None:
        return None
    model = load_trained(ctx.store, ctx.warm_start_artifact(f"{section}.init", ref, kind))
    theirs, ours = (json.loads(json.dumps(asdict(s))) for s in (model.spec, spec))  # tuples and lists alike
    differ = [f"{k} {theirs[k]} != {ours[k]}" for k in ours if theirs.get(k) != ours[k]]
    if differ:
        raise ConfigError(f"{section}.init {ref!r}: its architecture is not the one this run builds "
                          f"({'; '.join(differ)}, theirs first)")
    path = ctx.work_dir(kind) / "init.safetensors"  # in today's layout, whatever muse wrote it
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def target_tokenizer(store: ArtifactStore, tokens: Artifact, ref: str) -> Artifact | None:
    """The tokenizer that wrote a tokens column: from this store, else from the store the tokens artifact was read
    from (a stage given another store's tokens); None when neither holds it."""
    for where in (store, ArtifactStore(tokens.path.parents[1])):
        try:
            return where.resolve(ref)
        except MissingArtifact:
            continue
    return None


def train_masked_stage(ctx: StageContext, *, section: str, target: str, cond: str | None,
                       sampler: SamplerConfig) -> Artifact:
    """The whole of `train-base` / `train-superres`: train the stage's one output on the `target` tokens of its
    `tokens` input (given the `cond` tokens) with the settings of `config.<section>` (in-process, or on Ray Train
    workers), evaluate it and commit it."""
    (kind,) = ctx.outputs
    tokens, device, text_cfg = ctx.inputs["tokens"], ctx.device, ctx.config.tokenize.text_encoder
    settings: MaskedTransformerStageConfig = getattr(ctx.config, section)
    model_cfg, train_cfg, scene = settings.model, settings.train, settings.scene_conditioning
    schema = TokensSchema.of(tokens.path)
    geometry, text_info = schema.geometry, schema.text
    if scene and "seg_tokens" not in geometry:
        raise ConfigError(f"{section}.scene_conditioning needs scene tokens, but "
                          f"{tokens.ref} has none (its run recorded no scene maps: {tokens.manifest.details['scene_plan']})")
    precomputed = text_info is not None
    if precomputed:  # the encoder that made the tokens' embeddings is the one generation must use
        text_cfg = text_info.encoder
    text = CaptionMemory(text_cfg, precomputed, device)
    text_dim = text_info.dim if precomputed else text.encoder.dim
    if settings.image_conditioning and schema.image is None:
        raise ConfigError(f"{section}.image_conditioning needs CLIP image embeddings, but {tokens.ref} has none "
                          f"(tokenize writes them when the run trains a CLIP: train_clip.enabled)")
    image = schema.image if settings.image_conditioning else None
    spec = transformer_spec(model_cfg, geometry, text_dim, target, cond, scene, image.dim if image else 0)
    work_dir = ctx.work_dir(kind)
    micro_defaults = None
    if spec.micro_conditions:
        if "micro_conds" not in schema.columns:
            raise ConfigError(f"{section}.model.micro_conditions needs the micro_conds column, which {tokens.ref} "
                              f"lacks (an older tokenize wrote it): run tokenize again")
        micro_defaults = medians(TokenTable(tokens.path, "train").column("micro_conds", MICRO_DEFAULT_ROWS))
    columns = ["key", "caption", target, *([cond] if cond else []), *(["seg_tokens"] if scene else []),
               *(["text_emb", "text_len"] if precomputed else []), *(["micro_conds"] if spec.micro_conditions else []),
               *(["clip_image_emb"] if image else [])]
    tokenizer = target_tokenizer(ctx.store, tokens, geometry[target].tokenizer)
    tokenizer_path = None if tokenizer is None else tokenizer.path
    if tokenizer is None:  # tokens copied without it: train without sample grids
        for knob, used in (("edge_weight", settings.edge_weight != 1), ("code_smoothing", settings.code_smoothing)):
            if used:
                raise ConfigError(f"{section}.{knob} needs the tokenizer of {tokens.ref}'s {target}, "
                                  f"{geometry[target].tokenizer}, which is not in this store")
        log.warning("%s: no sample grids: tokenizer %s is not in this store", kind, geometry[target].tokenizer)
    job = TransformerJob(kind, spec, train_cfg, text_cfg, precomputed, tokens.path, columns, target, cond,
                         settings.text_drop_rate, settings.label_smoothing, settings.scene_drop_rate,
                         settings.image_drop_rate, work_dir,
                         tokenizer_path, sampler, warm_start(ctx, section, kind, spec), lora=settings.lora,
                         edge_weight=settings.edge_weight, code_smoothing=settings.code_smoothing,
                         mask_rate=settings.mask_rate)
    figures = fit(fit_worker, job, settings.workers, ctx.config.ray, work_dir)
    trained = MaskedTransformer(spec)
    if settings.lora is not None:
        apply_lora(trained, settings.lora)
    trained.load_state_dict(load_file(str(job.trained_path)))
    trained.to(device)
    try:
        val = TokenTable(tokens.path, "val", columns)
    except FileNotFoundError:
        val = TokenTable(tokens.path, "train", columns)
    metrics = masked_accuracy(trained, val, target, text, cond, device)
    steps, workers, updated = (int(figures.pop(k)) for k in ("steps", "workers", "trained_parameters"))
    with ctx.commit(kind, figures, MAX_GRIDS) as out:
        record = TransformerRecord(spec={}, target=target, cond=cond, scene=scene, text=text_info,
                                   text_encoder=text_cfg, sampling=sampler, micro_defaults=micro_defaults,
                                   clip=image.clip if image else None,
                                   tokenizers={k: g.tokenizer for k, g in geometry.items()})
        if settings.lora is None:
            save_transformer(trained, out.path, record.model_dump(mode="json", exclude={"spec"}))
        else:  # the adapters alone, on top of the init weights
            record = record.model_copy(update={"spec": asdict(spec), "adapter_of": settings.init})
            save_adapter(trained, settings.lora, out.path, record.model_dump(mode="json"))
        out.metrics = {**metrics, "steps": steps, "workers": workers,
                       "parameters": sum(p.numel() for p in trained.parameters()),
                       "trained_parameters": updated}
        out.details = {"spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
                       **({"init": settings.init} if settings.init else {})}
    log.info("%s: %s", kind, metrics)
    return out.artifact
