"""Pipeline configuration: one pydantic model per stage, held by `PipelineConfig`.

A resolved config is built from a YAML preset (`configs/NAME.yaml`), an optional
user YAML file merged over it, and `section.key=value` overrides applied last.
Every knob lives in exactly one model below, with its docstring beside it; code
reads attributes, never dict lookups with defaults. Unknown keys and wrong types
are errors that name the key path, raised before anything runs.
"""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from muse.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the file or key path."""


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        # pydantic reads true as 1: `steps: true` would train one step
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and field.annotation in (int, float, int | None, float | None):
                    raise ValueError(f"{name} needs a number, got {data[name]}")
        return data


# ----------------------------------------------------------------------------- data


class DemoConfig(Section):
    """The procedurally generated demo dataset (the default source)."""

    num_samples: int = Field(512, ge=1, description="Images generated.")
    image_size: int = Field(128, ge=16, description="Side of the square demo images, in pixels.")
    seed: int = Field(0, description="Seed: the same seed gives byte-identical images and captions.")


class ShardConfig(Section):
    """Stage `shard`: ingest image-caption data into webdataset tars."""

    source: str | None = Field(None, description="Folder, metadata file, tar path/brace pattern; None = demo.")
    source_kind: Literal["auto", "folder", "metadata", "webdataset", "demo"] = Field(
        "auto", description="How to read `source`; auto-detected from its path when 'auto'."
    )
    image_column: str | None = Field(None, description=(
        "Metadata column holding the image: a path relative to the metadata file, raw bytes, or a Hugging Face "
        "Image struct {bytes, path}; None = the first of file_name, image, jpg, png, webp present."))
    caption_column: str | None = Field(None, description=(
        "Metadata column holding the caption; None = the first of text, caption, txt present."))
    key_column: str = Field("key", description=(
        "Metadata column holding the producer's sample key (img2dataset's `key`), kept as the shard key "
        "when present."))
    min_side: int = Field(32, ge=1, description="Images whose shorter side is below this are rejected.")
    max_pixels: int = Field(
        89_478_485, ge=1, description="Images with more pixels are rejected (PIL's decompression-bomb limit)."
    )
    max_caption_chars: int = Field(2000, ge=1, description=(
        "Captions are cut to this many characters (after whitespace is collapsed); the cuts are counted."))
    image_format: Literal["jpg", "png"] = Field("jpg", description="Encoding of the stored images.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality when image_format is jpg.")
    samples_per_shard: int = Field(1000, ge=1, description="Samples per tar file.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of keys hashed into the val split.")
    dedupe: bool = Field(True, description="Drop samples whose original bytes repeat an earlier sample's.")
    workers: int = Field(2, ge=1, description="Decode/resize processes (engine: processes).")
    engine: Literal["processes", "ray"] = Field("processes", description=(
        "Where images are decoded, resized and encoded: a pool of `workers` processes here, or Ray Data over the "
        "cluster (ray.address; a local Ray without it), for sources one machine cannot decode in time; its workers "
        "read a webdataset source's tars themselves. Local source files must then be on a file system every node "
        "mounts. The same bytes either way."))


# ----------------------------------------------------------------------------- models


# Knobs only one quantizer (VQModelConfig.quantizer) or one architecture (VQModelConfig.arch) reads.
VQ_ONLY = ("code_dim", "use_cosine_sim", "ema_update", "decay", "threshold_ema_dead_code", "kmeans_init",
           "rotation_trick", "commitment_weight")
FSQ_ONLY = ("fsq_levels",)
TAMING_ONLY = ("mid_block", "attn_resolutions")


class VQModelConfig(Section):
    """Geometry and codebook of one VQGAN tokenizer."""

    arch: Literal["taming", "vqvae"] = Field("taming", description=(
        "taming: ResBlocks with GroupNorm at every level, attention, a middle block (the muse presets). "
        "vqvae: strided 4x4 convs, a residual stack at the token side, no norm; the i-th downsampling "
        "outputs ch*ch_mult[i+1] channels (several times faster per step for small CPU tokenizers)."))
    resolution: int = Field(..., ge=8, description="Input image side in pixels.")
    ch: int = Field(64, ge=8, description="Base channel width of encoder and decoder.")
    ch_mult: tuple[int, ...] = Field((1, 2, 2), description="Channel multiplier per level; levels-1 downsamplings.")
    num_res_blocks: int = Field(1, ge=0, description="taming: ResBlocks per level (the decoder has one more); "
                                "vqvae: residual units at the token side.")
    mid_block: bool = Field(True, description="taming: ResBlock-attention-ResBlock at the token side.")
    attn_resolutions: tuple[int, ...] = Field((), description="Feature-map sides that get self-attention.")
    embed_dim: int = Field(64, ge=1, description="Channels of the latent the codebook quantizes.")
    quantizer: Literal["vq", "fsq"] = Field("vq", description=(
        "vq: a learned codebook (vector-quantize-pytorch's VectorQuantize; the knobs below). fsq: finite scalar "
        "quantization (Mentzer et al. 2023): the latent is projected to len(fsq_levels) dims, each rounded to "
        "its own few levels; the implicit codebook is their product, so no code can die and none needs an EMA."))
    fsq_levels: tuple[int, ...] = Field((8, 5, 5, 5), description=(
        "fsq only: levels per dimension; codebook_size must be their product (8,5,5,5 -> 1000)."))
    codebook_size: int = Field(512, ge=2, le=65536, description="Number of codes (token ids fit uint16).")
    code_dim: int = Field(32, ge=1, description="Dimension of the (low-dim) codes; latents are projected to it.")
    use_cosine_sim: bool = Field(True, description="l2-normalised codes and latents (cosine-similarity lookup).")
    ema_update: bool = Field(True, description="Codebook updated by EMA; False = learned by the optimizer.")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of the codebook.")
    threshold_ema_dead_code: int = Field(2, ge=0, description="Codes used less than this are restarted; 0 = never.")
    kmeans_init: bool = Field(False, description="Initialise the codebook by k-means on the first batch.")
    rotation_trick: bool = Field(True, description="Rotation trick gradients through the quantizer (else STE).")
    commitment_weight: float = Field(0.25, ge=0, description="Weight of the commitment loss.")

    def versioned(self) -> dict:
        """The knobs this tokenizer reads, for its artifact's version: editing one the chosen quantizer or
        architecture ignores (a codebook knob under fsq, the levels under vq, the middle block under vqvae)
        would retrain an identical tokenizer."""
        ignored = (FSQ_ONLY if self.quantizer == "vq" else VQ_ONLY) + (TAMING_ONLY if self.arch == "vqvae" else ())
        return self.model_dump(mode="json", exclude=set(ignored))

    @property
    def downsample(self) -> int:
        """Spatial reduction factor f: 2 per level after the first."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_side(self) -> int:
        """Side of the token grid this tokenizer produces."""
        return self.resolution // self.downsample

    @model_validator(mode="after")
    def _valid(self) -> "VQModelConfig":
        if self.resolution % self.downsample:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling factor {self.downsample}"
            )
        if self.arch == "vqvae" and (len(self.ch_mult) < 2 or self.attn_resolutions):
            raise ValueError("arch vqvae needs at least one downsampling (2+ ch_mult levels) and no attention")
        if self.use_cosine_sim and not self.ema_update and self.quantizer == "vq":
            raise ValueError("a cosine-similarity codebook must be EMA-updated (ema_update: true)")
        if self.quantizer == "fsq":
            if not self.fsq_levels or min(self.fsq_levels) < 2:
                raise ValueError(f"fsq_levels {list(self.fsq_levels)}: need at least one dimension, each of 2+ levels")
            if math.prod(self.fsq_levels) != self.codebook_size:
                raise ValueError(f"codebook_size {self.codebook_size} must be the product of fsq_levels "
                                 f"{list(self.fsq_levels)} = {math.prod(self.fsq_levels)}")
        return self


class VQLossConfig(Section):
    """Reconstruction, perceptual and adversarial losses of an image tokenizer."""

    l1_weight: float = Field(1.0, ge=0, description="Weight of the L1 reconstruction loss.")
    l2_weight: float = Field(0.0, ge=0, description="Weight of the L2 reconstruction loss.")
    perceptual_weight: float = Field(1.0, ge=0, description="Weight of LPIPS (only when vgg_weights is set).")
    vgg_weights: str | None = Field(None, description="torchvision VGG16 weights path for LPIPS; None = no LPIPS.")
    disc_weight: float = Field(0.1, ge=0, description="Weight of the generator's hinge GAN loss; 0 = no GAN.")
    disc_start: int = Field(10_000, ge=0, description="Step at which the discriminator and GAN loss start.")
    disc_layers: int = Field(3, ge=1, description="Strided layers of the PatchGAN discriminator.")
    disc_ch: int = Field(64, ge=8, description="Base width of the discriminator.")


class TrainConfig(Section):
    """The shared training loop's knobs."""

    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Samples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="Adam betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR after warmup.")
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm per optimizer; 0 = no clipping.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of weights (used for eval/sampling); 0 = off.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU.")
    compile: bool = Field(False, description=(
        "torch.compile the trained modules' forward (fuses the norms and pointwise ops around the matmuls). "
        "Costs a compile at the first step, so the CPU presets leave it off."))
    activation_checkpointing: bool = Field(False, description=(
        "Recompute each transformer block's (and each VQGAN residual or attention block's) activations in "
        "backward instead of keeping them: the activations of one block instead of all, for one more forward "
        "per step; the same weights."))
    optimizer: Literal["adamw", "adamw8bit", "muon"] = Field("adamw", description=(
        "adamw: torch's AdamW (fused on a GPU); adamw8bit: bitsandbytes' AdamW with 8-bit moments, a quarter "
        "of the optimizer state's memory (`pip install 'muse-pipeline[bnb]'`); muon: orthogonalised momentum on "
        "the hidden weight matrices, AdamW on the rest, at the same lr (`muse.muon`)."))
    checkpoint_every: int = Field(200, ge=1, description="Steps between resumable checkpoints in .work/.")
    log_every: int = Field(50, ge=1, description="Steps between logged figures.")
    shuffle_buffer: int = Field(256, ge=1, description="Samples in the streaming shuffle buffer.")
    data_streams: int | None = Field(None, ge=1, description=(
        "Disjoint streams the training data is split into (every n-th tar or row group), each giving an equal "
        "share of every step's global batch; each worker reads its own streams. None = one per worker. Set it "
        "to a multiple of every worker count the run may use: the version then holds the global batch, not the "
        "worker count, and a run resumes on another number of workers with the same samples in every step."))
    seed: int = Field(0, description="Seed for weights, data order and masking.")
    peak_tflops: float | None = Field(None, gt=0, description="Dense peak of one accelerator in TFLOP/s (H100 SXM "
                                      "bf16: 989) for the logged MFU; None = no MFU figure.")

    def versioned(self) -> dict:
        """The knobs that change what is trained, for an artifact's version: how often it logs or checkpoints,
        the MFU peak, compiling and activation checkpointing (the same math) leave the weights alone; the
        default optimizer and data split are left out, so the versions made before they were knobs stand."""
        same = {"log_every", "checkpoint_every", "peak_tflops", "compile", "activation_checkpointing"}
        defaults = ({"optimizer"} if self.optimizer == "adamw" else set()) | \
            ({"data_streams"} if self.data_streams is None else set())
        return self.model_dump(mode="json", exclude=same | defaults)


# ----------------------------------------------------------------------------- stages


class RayConfig(Section):
    """Where stages that fan out (segment, tokenize) run their Ray work."""

    address: str | None = Field(None, description="Cluster to join ('auto', 'ray://host:10001'); None starts Ray locally.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray; None = all cores.")
    data_progress: bool = Field(False, description=(
        "Show Ray Data's own progress blocks and execution plans; the stages log their own progress and ETA."))


class PlacementConfig(Section):
    """How the stages a flow runs side by side share this machine's GPUs (`muse.placement`)."""

    stages_per_gpu: int = Field(1, ge=1, description=(
        "Stages that may train on one GPU at once; 1 = one after another when there are fewer GPUs than stages "
        "(each muse preset stage is sized for a whole GPU); raise it for models that fit together."))


class WorkersConfig(Section):
    """Data-parallel scale-out of a training stage on Ray Train (DDP; the data is sharded by rank)."""

    num_workers: int = Field(1, ge=1, description="Training processes; 1 trains in-process without Ray.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); False = CPU workers (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker.")

    def versioned(self) -> dict:
        """What changes the weights, for an artifact's version: how many workers share the data (each reads its
        own files), not where they run."""
        return {"num_workers": self.num_workers}


def data_parallel_versioned(train: TrainConfig, workers: WorkersConfig) -> dict:
    """The `train` and `workers` entries of a training stage's version. With `train.data_streams` set, the data
    split no longer follows the workers: the global batch (batch x grad_accum x workers) stands for how it is
    cut, so the same run on another worker count keeps its version and resumes (`muse.training.TrainLoop`)."""
    if train.data_streams is None:
        return {"train": train.versioned(), "workers": workers.versioned()}
    versioned = {k: v for k, v in train.versioned().items() if k not in ("batch_size", "grad_accum")}
    return {"train": versioned | {"global_batch": train.batch_size * train.grad_accum * workers.num_workers}}


class PanopticSegmenterConfig(Section):
    """COCO-panoptic segmenter: Hugging Face transformers (Mask2Former) or detectron2 (optional extra)."""

    backend: Literal["transformers", "detectron2"] = Field("transformers", description=(
        "transformers: a Mask2Former/MaskFormer checkpoint trained on COCO panoptic (installs with the "
        "project); detectron2: a model-zoo config (needs the detectron2 extra)."))
    model: str = Field("facebook/mask2former-swin-large-coco-panoptic", description=(
        "transformers: a local checkpoint directory or a Hugging Face hub id (the usual cache; HF_HUB_OFFLINE "
        "respected). `segmenters: auto` uses it only when its weights are already on this machine."))
    threshold: float = Field(0.8, ge=0, le=1, description="transformers: segments scored below this are dropped.")
    config_name: str = Field(
        "COCO-PanopticSegmentation/panoptic_fpn_R_101_3x.yaml", description="detectron2 model-zoo config."
    )
    weights: str | None = Field(None, description="detectron2: checkpoint path or URL; None = the model zoo's URL "
                                "for config_name.")
    id_scheme: Literal["separated", "contiguous"] = Field(
        "separated",
        description="detectron2: how segments_info category_id counts: 'separated' (Panoptic FPN: things 0-79, stuff 1-53) "
        "or 'contiguous' (0-132 over things then stuff, e.g. Panoptic-DeepLab, Mask2Former).",
    )


class HumanSegmenterConfig(Section):
    """SCHP-layout human-part parser (LIP classes)."""

    weights: str | None = Field(None, description="SCHP LIP checkpoint path.")
    allow_random_weights: bool = Field(False, description="Run without weights (smoke tests only: maps are noise).")
    input_size: int = Field(473, ge=32, description="Side the image is resized to for parsing.")


class FaceSegmenterConfig(Section):
    """Face parts from face-alignment's 68 landmarks (optional extra)."""

    face_detector: str = Field("sfd", description="face-alignment detector: sfd, blazeface, dlib.")


class MasksSegmenterConfig(Section):
    """Ground-truth masks shipped with a dataset (COCO-panoptic PNG + segments_info)."""

    categories_file: str | None = Field(
        None, description="COCO-panoptic json with 'categories'; None = each sample's json carries its categories."
    )


class SegmentConfig(Section):
    """Stage `segment`: Make-A-Scene scene maps (one label per pixel + an edge map)."""

    segmenters: Literal["auto", "none"] | list[Literal["masks", "panoptic", "human", "face"]] = Field(
        "auto", description=(
            "Segmenters to run and merge ('masks' reads a dataset's ground truth instead of panoptic). auto: "
            "masks where the source ships them, else the model segmenters whose extras and weights are on this "
            "machine (panoptic, with human when segment.human.weights is set and face when face-alignment is "
            "installed), else no scene maps. none: no scene maps (no scene tokenizer, no seg_tokens)."))
    dataset_classes: list[str] = Field(
        [], description="Class names of a dataset's own masks, appended to the label space after the face parts."
    )
    batch_size: int = Field(16, ge=1, description="Images per segmenter call.")
    concurrency: int = Field(1, ge=1, description="Actors per segmenter model.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; None = 1 when the cluster has GPUs, else 0.")
    max_failed_fraction: float = Field(0.01, ge=0, le=1, description="Fail the stage above this failure rate.")
    panoptic: PanopticSegmenterConfig = Field(default_factory=PanopticSegmenterConfig, description="panoptic segmenter.")
    human: HumanSegmenterConfig = Field(default_factory=HumanSegmenterConfig, description="human segmenter.")
    face: FaceSegmenterConfig = Field(default_factory=FaceSegmenterConfig, description="face segmenter.")
    masks: MasksSegmenterConfig = Field(default_factory=MasksSegmenterConfig, description="masks segmenter.")

    @field_validator("segmenters", mode="before")
    @classmethod
    def _auto_none_or_a_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("auto", "none"):
            raise ValueError(f"auto, none or a list of masks, panoptic, human, face (got {value!r})")
        return value

    @model_validator(mode="after")
    def _one_base(self) -> "SegmentConfig":
        if isinstance(self.segmenters, str):
            return self
        if "masks" in self.segmenters and "panoptic" in self.segmenters:
            raise ValueError("use either 'masks' or 'panoptic' as the base segmenter, not both")
        if not self.segmenters:
            raise ValueError("at least one segmenter is needed (or 'none' for no scene maps)")
        return self


# A trained artifact to begin from, KIND:VERSION with its 12-hex content version.
WarmStart = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]*:[0-9a-f]{12}$")]


class TrainOverride(Section):
    """Per-tokenizer exceptions to the shared training loop settings."""

    steps: int | None = Field(None, ge=1, description="Optimizer steps; None = train.steps.")
    batch_size: int | None = Field(None, ge=1, description="Micro-batch size; None = train.batch_size.")


class TrainVQGANConfig(Section):
    """Stage `train-vqgan`: low-res (f16) and high-res (f8) image tokenizers and the scene tokenizer."""

    low: VQModelConfig = Field(..., description="Tokenizer for the base transformer's resolution.")
    high: VQModelConfig = Field(..., description="Tokenizer for the super-res transformer's resolution.")
    seg: VQModelConfig = Field(..., description="Scene tokenizer over one-hot label maps + the edge channel.")
    loss: VQLossConfig = Field(default_factory=VQLossConfig, description="Image tokenizer losses.")
    face_class_weight: float = Field(5.0, ge=1, description="Cross-entropy weight of face-part labels (vqseg).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop (each tokenizer).")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description=(
        "Ray Train data parallelism of each tokenizer (train.batch_size per worker; the discriminator too)."))
    overrides: dict[Literal["low", "high", "seg"], TrainOverride] = Field(
        {}, description="Per-tokenizer steps / batch size, e.g. a smaller batch for the high-res one."
    )
    init: dict[Literal["low", "high", "seg"], WarmStart] = Field({}, description=(
        "Warm starts: a tokenizer begins from a trained artifact's weights instead of random ones, e.g. "
        "{low: vqgan-low:VERSION} (the content version from `muse artifacts ls`), which its version and lineage "
        "then pin. Its architecture must be the one this section builds; the optimizer and discriminator start "
        "afresh."))

    def train_for(self, tokenizer: str) -> TrainConfig:
        """The shared loop settings with this tokenizer's overrides applied."""
        o = self.overrides.get(tokenizer)
        if o is None:
            return self.train
        return self.train.model_copy(update={k: v for k, v in o.model_dump().items() if v is not None})


class TextEncoderConfig(Section):
    """Which text encoder turns captions into the transformers' cross-attention memory."""

    kind: Literal["minilm", "clip", "t5"] = Field("minilm", description="Encoder family (see muse.models.text).")
    model: str = Field("ViT-B-32", description="clip: open_clip model name; t5: hub name (e.g. google/t5-v1_1-base).")
    pretrained: str | None = Field(
        None, description="Weights: a local directory/checkpoint or an open_clip tag; None = minilm's packaged weights.")
    tokenizer: str | None = Field(None, description="t5 only: tokenizer name/path when it differs from the model's.")
    max_length: int = Field(32, ge=4, le=512, description="Tokens kept per caption (the memory length L).")
    random_weights: bool = Field(False, description="Build the architecture with random weights (tests, smoke runs).")
    random_width: int = Field(64, ge=8, description="t5 with random_weights: hidden size of the random encoder.")
    random_seed: int = Field(0, description="Seed of random weights: tokenize, training and generation build the "
                             "same encoder.")


class TokenizeConfig(Section):
    """Stage `tokenize`: precompute tokens and text embeddings into parquet."""

    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig, description="Caption encoder.")
    precompute_text: bool = Field(True, description="Store text embeddings in the parquet rows.")
    batch_size: int = Field(64, ge=1, description="Images per encoder call.")
    row_group_size: int = Field(4096, ge=1, description="Rows per parquet row group.")
    aesthetic_field: str | None = Field(None, description=(
        "Dotted path of an aesthetic score in each sample's metadata JSON (a source column rides along under "
        "source_info, e.g. source_info.aesthetic), stored in micro_conds; None = no score (NaN)."))
    concurrency: int = Field(1, ge=1, description="Encoder actors (each holds the VQ encoders and text encoder).")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each encoder actor reserves (its torch threads).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per encoder actor; None = 1 when the cluster has GPUs, else 0.")


class TransformerConfig(Section):
    """Width and depth of a masked transformer."""

    dim: int = Field(256, ge=8, description="Hidden size.")
    depth: int = Field(4, ge=1, description="Transformer blocks.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    cond_depth: int = Field(2, ge=1, description="Super-res only: blocks encoding the low-res tokens.")
    cond_aligned: bool = Field(True, description=(
        "Super-res only: also add the encoded low-res tokens, upsampled to the high-res grid, to the input "
        "embeddings (besides the cross-attention memory of the paper). Each high-res token then sees the "
        "low-res token it refines at its own position."))
    cond_upsample: Literal["nearest", "subpixel"] = Field("nearest", description=(
        "Super-res with cond_aligned: how the low-res grid reaches the high-res one. nearest: each low-res vector "
        "copied to the positions it covers; subpixel: a 3x3 convolution and pixel shuffle, so each high-res "
        "position gets its own projection of its low-res token and their neighbours (where an outline runs)."))
    patch: int = Field(1, ge=1, description=(
        "Token positions merged per side before the blocks (aMUSEd's U-ViT downsampling): attention and the MLPs "
        "run on (side/patch)^2 positions, and every token is predicted from its block's output and its own input; "
        "1 = every token is a position."))
    pooled_text: bool = Field(False, description=(
        "Give the memory a global token made from the pooled caption embedding (aMUSEd), the masked mean of its "
        "token embeddings; it is hidden with the text when the text is dropped."))
    micro_conditions: list[Literal["original_size", "crop", "aesthetic"]] = Field([], description=(
        "Micro-conditions (per-image facts from the tokens' micro_conds column) in the global token: the size "
        "before resizing, the crop's top-left corner, the aesthetic score. Generation passes the values wanted "
        "(default: the training rows' medians)."))

    @field_validator("micro_conditions")
    @classmethod
    def _each_condition_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"names a condition twice: {value}")
        return value


class LoraConfig(Section):
    """LoRA finetuning (peft): low-rank adapters on the warm-started model's linear layers, the rest frozen."""

    rank: int = Field(..., ge=1, description="Rank r of each adapter (B @ A, A: r x in, B: out x r).")
    alpha: float | None = Field(None, gt=0, description="Adapter updates are scaled by alpha / rank; None = rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(["qkv", "q", "kv", "out"], min_length=1, description=(
        "Names (last parts) of the linear layers adapted: the attention projections by default; add mlp.0 and "
        "mlp.2 for the MLPs."))


class MaskedTransformerStageConfig(Section):
    """Stages `train-base` (text -> low-res tokens) and `train-superres` (low-res tokens and text -> high-res
    tokens): one masked transformer and how it is trained."""

    model: TransformerConfig = Field(default_factory=TransformerConfig, description="Architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    text_drop_rate: float = Field(0.1, ge=0, le=1, description="Fraction of samples trained without text (CFG).")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the masked-token cross-entropy.")
    edge_weight: float = Field(1.0, ge=1, description=(
        "Loss weight of the tokens on a colour edge of their decoded grid (the outlines; `muse.edge_weights`) "
        "against 1 for the rest; 1 = every token alike. Needs the target tokens' tokenizer in the store."))
    code_smoothing: float = Field(0.0, ge=0, le=1, description=(
        "Share of each masked token's target spread over the codes nearest its own in the tokenizer's latent "
        "space (`muse.code_smoothing`), since near codes decode to near pixels; 0 = one-hot targets. Needs the "
        "target tokens' tokenizer in the store."))
    mask_rate: Literal["arccos", "uniform", "beta"] = Field("arccos", description=(
        "Distribution of the per-sample mask rate in training (`muse.masking`): Muse's arccos (mean 0.64, most "
        "samples nearly all masked), uniform (mean 0.5: more samples with most of the grid given, where its "
        "outlines are filled in) or beta, Beta(2, 2) (mean 0.5, fewer grids nearly all masked or nearly all "
        "given). Sampling's schedule is the same for all."))
    scene_conditioning: bool = Field(False, description="Add the scene tokens (seg_tokens) to the memory.")
    scene_drop_rate: float = Field(0.5, ge=0, le=1, description="With scene conditioning: fraction of samples "
                                   "trained without scene tokens, so the model also generates from text alone.")
    image_conditioning: bool = Field(False, description=(
        "Add the image's CLIP embedding (the tokens' clip_image_emb, from a `clip` artifact) to the memory as one "
        "projected token (DALL-E 2's image latent), so generation can start from an image's embedding or a "
        "prior's; brings train-clip into full-train."))
    image_drop_rate: float = Field(0.2, ge=0, le=1, description="With image conditioning: fraction of samples "
                                   "trained without the image embedding, so text-only generation still works.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Ray Train data parallelism.")
    init: WarmStart | None = Field(None, description=(
        "Warm start: begin from this trained artifact's weights instead of random ones, as KIND:VERSION with its "
        "content version from `muse artifacts ls` (e.g. base:adf3b5352375), so the version and lineage pin it. "
        "Its architecture must be the one this section builds; optimizer and schedule start afresh."))
    lora: LoraConfig | None = Field(None, description=(
        "Train LoRA adapters on top of `init` instead of all its weights; the artifact then holds the adapters "
        "alone and loads on top of `init`. None = full finetuning."))

    @model_validator(mode="after")
    def _lora_adapts_a_trained_model(self) -> "MaskedTransformerStageConfig":
        if self.lora is not None and self.init is None:
            raise ValueError("lora needs init: the trained model (KIND:VERSION) the adapters are trained on")
        return self


class ClipArchConfig(Section):
    """An open_clip architecture: a named model with sizes overridden (None keeps the named model's)."""

    name: str = Field("ViT-B-32", description="open_clip model whose config the sizes below override.")
    embed_dim: int | None = Field(None, ge=8, description="Width of the shared image-text embedding.")
    image_size: int | None = Field(None, ge=16, description="Side images are resized to for the image tower.")
    patch_size: int | None = Field(None, ge=1, description="ViT patch side.")
    vision_width: int | None = Field(None, ge=8, description="Image tower width.")
    vision_layers: int | None = Field(None, ge=1, description="Image tower blocks.")
    vision_head_width: int | None = Field(None, ge=8, description="Image tower attention head width.")
    context_length: int | None = Field(None, ge=4, description="Caption tokens kept.")
    text_width: int | None = Field(None, ge=8, description="Text tower width.")
    text_heads: int | None = Field(None, ge=1, description="Text tower attention heads.")
    text_layers: int | None = Field(None, ge=1, description="Text tower blocks.")

    @property
    def resized(self) -> bool:
        return any(v is not None for k, v in self.model_dump().items() if k != "name")


class TrainClipConfig(Section):
    """Stage `train-clip`: a CLIP (open_clip) on the user's own image-caption pairs, contrastively (ClipLoss)."""

    enabled: bool = Field(False, description="Train a CLIP in full-train (implied by train_base.image_conditioning): "
                          "evaluate's CLIP score and the image-embedding conditioning then use it.")
    model: ClipArchConfig = Field(default_factory=ClipArchConfig, description="Architecture.")
    pretrained: str | None = Field(None, description=(
        "Start from these open_clip weights (a tag such as laion2b_s34b_b79k, or a checkpoint path) of `model.name`, "
        "which then must not be resized; None = random weights."))
    freeze: bool = Field(False, description="With pretrained: commit the pretrained model as it is, untrained.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description=(
        "Ray Train data parallelism (train.batch_size per worker; the loss contrasts the union batch)."))

    @model_validator(mode="after")
    def _pretrained_fixes_the_sizes(self) -> "TrainClipConfig":
        if self.pretrained is not None and self.model.resized:
            raise ValueError("pretrained weights fix the architecture: leave model's sizes unset")
        if self.freeze and self.pretrained is None:
            raise ValueError("freeze needs pretrained weights (a random CLIP would stay random)")
        return self


class TrainPriorConfig(Section):
    """Stage `train-prior`: caption embedding -> CLIP image embedding (unCLIP's prior), for `generate --prior`."""

    enabled: bool = Field(False, description="Train the prior in full-train (needs train_clip).")
    dim: int = Field(256, ge=8, description="Width of the MLP.")
    depth: int = Field(2, ge=0, description="Residual MLP blocks.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Ray Train data parallelism.")


class TrainGuideConfig(Section):
    """Stage `train-guide`: a small head on the frozen base's mid-layer hidden states, whose gradient steers
    sampling (`muse.guidance`)."""

    enabled: bool = Field(True, description="Train a guide in full-train (and let evaluate compare guided samples).")
    target: Literal["caption", "score", "label"] = Field("caption", description=(
        "caption: contrastive agreement of the pooled features with the caption's text embedding; score: a "
        "number from each sample's metadata; label: a class from each sample's metadata."))
    field: str | None = Field(None, description="score / label: dotted path of the value in a sample's metadata "
                              "JSON, list items by index (e.g. aesthetic, source_info.objects.0.shape).")
    score_bins: int = Field(0, ge=0, description="score: 0 = regression on the value; n >= 2 = classification "
                            "into n quantile bins of the train values.")
    block: int | None = Field(None, ge=0, description="Base block whose output is hooked; None = the middle one "
                              "(depth // 2).")
    dim: int = Field(128, ge=8, description="Width of the head.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description=(
        "Ray Train data parallelism (train.batch_size per worker; a caption target contrasts each worker's batch)."))

    @model_validator(mode="after")
    def _field_for_metadata_targets(self) -> "TrainGuideConfig":
        if self.target in ("score", "label") and not self.field:
            raise ValueError(f"target {self.target} needs field (where the value is in each sample's metadata)")
        if self.score_bins == 1:
            raise ValueError("score_bins must be 0 (regression) or at least 2")
        return self


class FinetuneDecoderConfig(Section):
    """Stage `finetune-decoder`: a larger decoder for the frozen high-res tokenizer."""

    extra_res_blocks: int = Field(1, ge=0, description="ResBlocks added per decoder level.")
    channel_mult: float = Field(1.5, ge=1.0, description="Decoder width relative to the original.")
    superres_rows: int = Field(0, ge=0, description=(
        "Train on super-res's own samples instead of the tokenizer's codes: for the first this many train rows of "
        "`tokens`, super-res samples a grid from the image's true low-res grid and caption, and the decoder learns "
        "that grid -> the image (`muse.superres_codes`), the codes it is given in generation; reads `superres`. "
        "0 = the frozen tokenizer's codes of every train image."))
    loss: VQLossConfig = Field(default_factory=VQLossConfig, description="Reconstruction, LPIPS and GAN losses.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description=(
        "Ray Train data parallelism (train.batch_size per worker; the discriminator too)."))


class SamplerConfig(Section):
    """One pass of iterative parallel decoding (`muse.sampling.decode`)."""

    steps: int = Field(24, ge=1, description="Decoding steps; the masked count follows a cosine schedule.")
    guidance_scale: float = Field(3.0, ge=0, description="Final classifier-free guidance scale t: "
                                  "l_g = (1 + t) l_c - t l_u.")
    guidance_schedule: Literal["linear", "constant"] = Field(
        "linear", description="t rises linearly from 0 over the steps, or stays at guidance_scale.")
    temperature: float = Field(1.0, ge=0, description="Temperature of the token samples, annealed linearly to 0.")
    confidence_temperature: float = Field(4.5, ge=0, description="Randomness of which tokens are kept (MaskGIT's "
                                          "choice temperature), annealed to 0.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens; None = all.")
    order: Literal["confidence", "halton"] = Field("confidence", description=(
        "Which sampled tokens each step keeps: the most confident (MaskGIT), or the next positions of a Halton "
        "sequence over the grid (Halton-MaskGIT), which spreads each step's tokens apart so neighbours are decided "
        "in later steps, each seeing the others."))


class GuideSamplingConfig(Section):
    """Mid-layer guidance while the base samples (`muse.guidance`), with a `guide` artifact trained for that base."""

    scale: float = Field(0.0, description="Step along the guide head's gradient, in units of the hooked hidden "
                         "states' RMS per position; 0 = off, a negative scale steers away.")
    label: str | None = Field(None, description="Guides trained on `label`: the class steered towards.")


class SamplingConfig(Section):
    """How images are sampled from the trained transformers, by evaluate, the training previews, the Python API
    and `muse generate` / `muse edit`. A trained transformer records its pass, so generation defaults to the
    settings of the run that trained it."""

    base: SamplerConfig = Field(default_factory=SamplerConfig, description="The base pass (low-res tokens).")
    superres: SamplerConfig = Field(default_factory=lambda: SamplerConfig(steps=8),
                                    description="The super-res pass (high-res tokens from the low-res ones).")
    guide: GuideSamplingConfig = Field(default_factory=GuideSamplingConfig,
                                       description="Mid-layer guidance of the base pass.")
    micro: dict[Literal["original_width", "original_height", "crop_top", "crop_left", "aesthetic"], float] = Field(
        {}, description="Micro-conditions asked of transformers trained with model.micro_conditions (e.g. "
        "{aesthetic: 6.5, crop_top: 0, crop_left: 0}); a name left out takes the training rows' median.")


class EvaluateConfig(Section):
    """Stage `evaluate`: samples (drawn with the `sampling` section) and metrics over every trained artifact."""

    num_prompts: int = Field(64, ge=1, description="Val captions to generate images for.")
    batch_size: int = Field(16, ge=1, description="Prompts generated per batch.")
    seed: int = Field(0, description="Sampling seed (same seed, same images).")
    clip_model: str = Field("ViT-B-32", description="open_clip model for the CLIP score.")
    clip_pretrained: str | None = Field(
        None, description="open_clip tag or checkpoint path; None = random weights (the score is flagged as such).")
    inception_weights: str | None = Field(None, description=(
        "Path of the FID Inception network's weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth, "
        "the network of TF FID and pytorch-fid); None = FID skipped with the reason."))
    fid_reference_images: int | None = Field(None, ge=2, description=(
        "Real images of the split FID compares against (the first N); None = all of them."))
    guide_scales: list[float] = Field([0.0, 0.25], description="With a trained guide: guide scales sampled too "
                                      "(same prompts and seeds) and graded beside the `sampling` section's own.")


class PipelineConfig(Section):
    """Everything a pipeline run needs, one section per stage."""

    preset: str = Field("custom", description="Name of the preset this config started from (informational).")
    demo: DemoConfig = Field(default_factory=DemoConfig, description="Demo dataset.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray runtime for fan-out stages.")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="GPUs of concurrent stages.")
    shard: ShardConfig = Field(default_factory=ShardConfig, description="Stage shard.")
    segment: SegmentConfig = Field(default_factory=SegmentConfig, description="Stage segment.")
    train_vqgan: TrainVQGANConfig = Field(..., description="Stage train-vqgan.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Stage tokenize.")
    train_base: MaskedTransformerStageConfig = Field(default_factory=MaskedTransformerStageConfig,
                                                     description="Stage train-base.")
    train_superres: MaskedTransformerStageConfig = Field(default_factory=MaskedTransformerStageConfig,
                                                         description="Stage train-superres.")
    train_clip: TrainClipConfig = Field(default_factory=TrainClipConfig, description="Stage train-clip.")
    train_guide: TrainGuideConfig = Field(default_factory=TrainGuideConfig, description="Stage train-guide.")
    train_prior: TrainPriorConfig = Field(default_factory=TrainPriorConfig, description="Stage train-prior.")
    finetune_decoder: FinetuneDecoderConfig = Field(
        default_factory=FinetuneDecoderConfig, description="Stage finetune-decoder."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampler settings.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Stage evaluate.")

    @property
    def trains_clip(self) -> bool:
        """train-clip runs in full-train: asked for, or implied by the base's image-embedding conditioning."""
        return self.train_clip.enabled or self.train_base.image_conditioning or self.train_prior.enabled

    @property
    def image_resolution(self) -> int:
        """Side the shards are cropped to: the largest resolution any tokenizer reads."""
        return max(self.train_vqgan.low.resolution, self.train_vqgan.high.resolution)


# ----------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    """Names of the bundled presets (`configs/*.yaml`)."""
    root = importlib.resources.files("muse.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping naming a key twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        # Only the problem and where (line, column): never the file's lines, which may hold secrets.
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"{origin}: invalid YAML{at}: {getattr(e, 'problem', None) or type(e).__name__}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base`; mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as YAML (so 3, 1e-4, [a, b])."""
    path, sep, raw = text.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key {path}")
        elif e["type"] == "missing":
            lines.append(f"{origin}: missing key {path}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"{origin}: {path}: {e['msg']}{shown}")
    return "\n".join(lines)


def load_config(
    preset: str | None = "tiny",
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """Resolve preset + file + overrides into a validated `PipelineConfig`."""
    data: dict[str, Any] = {}
    origins = []
    if preset:
        if preset not in preset_names():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(preset_names())}")
        text = importlib.resources.files("muse.configs").joinpath(f"{preset}.yaml").read_text()
        data = _read_yaml(text, f"configs/{preset}.yaml")
        data["preset"] = preset
        origins.append(f"preset {preset}")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        data = _merge(data, _read_yaml(path.read_text(), str(path)))
        origins.append(str(path))
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key} is not a section")
            node = child
        node[keys[-1]] = value
    if overrides:
        origins.append("--set")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, " + ".join(origins) or "config")) from None


def gpu_workers(num_gpus: int) -> list[str]:
    """Overrides that put every training stage (each section with `workers`) on `num_gpus` Ray Train GPU workers."""
    if num_gpus < 1:
        raise ConfigError(f"--gpus {num_gpus}: needs at least 1")
    sections = [name for name, field in PipelineConfig.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
                and "workers" in field.annotation.model_fields
                and field.annotation.model_fields["workers"].annotation is WorkersConfig]
    return [o for name in sections for o in (f"{name}.workers.num_workers={num_gpus}", f"{name}.workers.use_gpu=true")]


def dump_config(config: PipelineConfig) -> str:
    """The resolved config as YAML (what `muse config show` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
