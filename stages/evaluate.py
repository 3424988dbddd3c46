"""Stage `evaluate`: generate images for held-out captions and grade everything that was trained.

Figures in the `report` artifact: caption alignment of generated images on demo data
(colour / shape / position, graded from pixels by `datasets.demo_check`), CLIP score
(open_clip; flagged when its weights are random), FID against the val images (on the
standard FID Inception network when its weights are configured, `muse.fid`; otherwise skipped
with the reason), each with the protocol it followed, the tokenizers' and
the finetuned decoder's val reconstruction PSNR, and codebook usage of the tokens. On demo
data, the alignment of each link fed its true input (the base's samples decoded by the
low-res tokenizer, tokenizer and decoder reconstructions, super-res from the real low-res
tokens) says where generated images lose what the caption names. A grid of prompts and
samples goes to the Prefect page. With a `guide` artifact (train_guide.enabled), the same
prompts and seeds are also sampled at each of `evaluate.guide_scales`, and the `guidance`
table gives each scale's alignment figures and time per image.
"""

from __future__ import annotations

import itertools
import json
import logging
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from muse.artifacts.store import PREVIEW_DIR, Artifact, ArtifactStore
from muse.config import EvaluateConfig, PipelineConfig, SamplingConfig
from muse.contracts import TokensSchema, metric
from muse.datasets.demo_check import grade
from muse.datasets.shards import read_samples
from muse.datasets.tokens import TokenTable
from muse.fid import InceptionFeatures, frechet_distance, reference_statistics, statistics, weights_digest
from muse.generate import TextToImage, pil_to_tensor, to_images
from muse.labelled_grid import caption_lines
from muse.models.clip import load_clip
from muse.stage import StageContext
from muse.training import seeded

NAME = "evaluate"
INPUTS: tuple[str, ...] = ("shards", "vqgan-low", "vqgan-high", "tokens", "base", "superres", "decoder", "guide",
                           "clip", "prior")
OUTPUTS: tuple[str, ...] = ("report",)
CODE_VERSION = "5"
BASE_LINK = "base samples through the vqgan-low decoder"
PARTS = ("colour", "shape", "position")

log = logging.getLogger("muse.stages.evaluate")


def inputs_of(config: PipelineConfig) -> tuple[str, ...]:
    """Every input but `guide`, `clip` and `prior` when they are not trained."""
    skip = {k for k, on in (("guide", config.train_guide.enabled), ("clip", config.trains_clip),
                            ("prior", config.train_prior.enabled)) if not on}
    return tuple(k for k in INPUTS if k not in skip)


def config_of(config: PipelineConfig) -> dict:
    """The stage's settings and the sampler settings its images are drawn with."""
    return config.evaluate.model_dump(mode="json") | {"sampling": config.sampling.model_dump(mode="json")}


def clip_score(images: list[Image.Image], captions: list[str], c: EvaluateConfig, device: torch.device,
               clip: Artifact | None = None) -> dict:
    """Mean 100 x max(cosine(image, caption), 0) (torchmetrics' CLIPScore definition) in batches on `device`, under
    `evaluate.clip_pretrained` when set, else under the run's own `clip` artifact (trained on this data) when there
    is one, else under random open_clip weights, and then flagged.

    Random weights are drawn from `c.seed`: the score means nothing, but two reports of the same
    images then show the same figure, so a change in it is a change in the images."""
    if c.clip_pretrained is None and clip is not None:
        own = load_clip(clip.path).to(device)
        encode_images = lambda ims: own.encode_images(torch.stack([pil_to_tensor(i) for i in ims]).to(device))  # noqa: E731
        encode_text, model_name, weights = own.encode_captions, own.arch.name, f"{clip.ref} (train-clip on this data)"
    else:
        import open_clip

        with seeded(c.seed):
            model, _, preprocess = open_clip.create_model_and_transforms(c.clip_model, pretrained=c.clip_pretrained)
        tokenizer = open_clip.get_tokenizer(c.clip_model)
        model.eval().to(device)
        encode_images = lambda ims: model.encode_image(  # noqa: E731
            torch.stack([preprocess(i) for i in ims]).to(device), normalize=True)
        encode_text = lambda caps: model.encode_text(tokenizer(caps).to(device), normalize=True)  # noqa: E731
        model_name, weights = c.clip_model, c.clip_pretrained or "random (score not meaningful)"
    scores = []
    with torch.no_grad():
        for i in range(0, len(images), c.batch_size):
            img = encode_images(images[i:i + c.batch_size])
            txt = encode_text(captions[i:i + c.batch_size])
            scores.append((100 * (img * txt).sum(-1).clamp_min(0)).cpu())
    return {"clip_score": round(float(torch.cat(scores).mean()), 3), "clip_weights": weights,
            "clip_protocol": f"CLIP score (100 x max(cos, 0), mean) of {len(images)} images at "
                             f"{images[0].size[0]} px and their captions; open_clip {model_name}, weights {weights}"}


def grade_samples(images: list[Image.Image], samples: list[dict]) -> list[list[dict[str, bool]]]:
    """Per image, per object its demo caption names: colour, shape and position right or not."""
    return [grade(img, s["info"]["source_info"]["objects"]) for img, s in zip(images, samples)]


def alignment(per_image: list[list[dict[str, bool]]]) -> dict[str, float]:
    """Fraction of named objects graded right for colour, shape and position."""
    objects = [r for g in per_image for r in g]
    return {part: round(float(np.mean([r[part] for r in objects])), 4) for part in PARTS}


def alignment_by_link(pipe: TextToImage, samples: list[dict], tokens_root, c: EvaluateConfig,
                      sampling: SamplingConfig) -> list[dict]:
    """Caption alignment of each link of the chain when fed its true input, the val images' own tokens: the
    tokenizers' and the finetuned decoder's reconstructions, and super-res sampled from the true low-res tokens.
    Generated images cannot beat their weakest link, so this (with the base's row, its samples decoded by the
    low-res tokenizer, which `run` adds) says where colour, shape or position is lost."""
    wanted = {s["key"] for s in samples}
    table = TokenTable(tokens_root, "val", ["key", "tokens_low", "tokens_high"])
    rows: dict[str, dict] = {}
    for i in range(len(table)):
        if len(rows) == len(wanted):
            break
        row = table[i]
        if row["key"] in wanted:
            rows[row["key"]] = row
    samples = [s for s in samples if s["key"] in rows]
    if not samples:
        return []
    high_side = pipe.vq_high.cfg.token_side
    images: dict[str, list[Image.Image]] = {name: [] for name in (
        "vqgan-low reconstruction", "vqgan-high reconstruction", "decoder on true high-res tokens",
        "super-res from true low-res tokens")}
    for i in range(0, len(samples), c.batch_size):
        chunk = samples[i:i + c.batch_size]
        low = torch.stack([rows[s["key"]]["tokens_low"] for s in chunk]).to(pipe.device)
        high = torch.stack([rows[s["key"]]["tokens_high"] for s in chunk]).to(pipe.device)
        with torch.no_grad():
            images["vqgan-low reconstruction"] += to_images(pipe.decode_tokens({"tokens_low": low}))
            high_grid = high.view(-1, high_side, high_side)
            images["vqgan-high reconstruction"] += to_images(pipe.vq_high.decode_codes(high_grid))
            images["decoder on true high-res tokens"] += to_images(pipe.decode_tokens({"tokens_high": high}))
        images["super-res from true low-res tokens"] += pipe(
            [s["caption"] for s in chunk], tokens_low=low, sampling=sampling, seed=c.seed + i)
    return [{"link": name, "images": len(ims), **alignment(grade_samples(ims, samples))}
            for name, ims in images.items()]


def variation_alignment(pipe: TextToImage, samples: list[dict], sampling: SamplingConfig,
                        c: EvaluateConfig) -> dict[str, float]:
    """Variations of real demo images from their CLIP embeddings alone (no caption), graded against each image's
    own objects, and against the next image's (what an unrelated image would score: the chance level)."""
    images = []
    real = pipe.image_embeddings([s["image"] for s in samples])
    for i in range(0, len(samples), c.batch_size):
        tokens = pipe.generate_tokens([""] * len(real[i:i + c.batch_size]), sampling=sampling, seed=c.seed + i,
                                      image_emb=real[i:i + c.batch_size])
        images += to_images(pipe.decode_tokens(tokens))
    own = alignment(grade_samples(images, samples))
    other = alignment(grade_samples(images, samples[1:] + samples[:1]))
    # under the same CLIP: is each variation nearer its own image than every other image of the set?
    sims = pipe.image_embeddings(images) @ real.T
    nearest = float((sims.argmax(1) == torch.arange(len(images), device=sims.device)).float().mean())
    return {**{f"alignment_{p}_variations": v for p, v in own.items()},
            **{f"alignment_{p}_variations_other_image": v for p, v in other.items()},
            "variations_nearest_own_image": round(nearest, 4), "variations_nearest_chance": round(1 / len(images), 4)}


def generate(pipe: TextToImage, captions: list[str], sampling: SamplingConfig,
             c: EvaluateConfig, prior: bool = False) -> tuple[list[Image.Image], list[torch.Tensor], float]:
    """(images, base token grids per batch, seconds) for the captions, in batches seeded by their position
    (`prior`: conditioned on the prior's image embeddings too)."""
    images: list[Image.Image] = []
    tokens_low: list[torch.Tensor] = []
    start = time.perf_counter()
    for i in range(0, len(captions), c.batch_size):
        tokens = pipe.generate_tokens(captions[i:i + c.batch_size], sampling=sampling, seed=c.seed + i, prior=prior)
        images += to_images(pipe.decode_tokens(tokens))
        tokens_low.append(tokens["tokens_low"])
    return images, tokens_low, time.perf_counter() - start


def fid(generated: list[Image.Image], shards: Artifact, split: str, c: EvaluateConfig, store: ArtifactStore,
        device: torch.device) -> dict:
    """FID of the generated images against the real images of `shards`' split at the same resolution, on the
    standard FID network (`muse.fid`), with the protocol it followed; or the reason it was skipped."""
    if c.inception_weights is None:
        return {"fid": None, "fid_skipped": "no evaluate.inception_weights (the FID Inception network's weights, "
                "torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"}
    features = InceptionFeatures(c.inception_weights, device, c.batch_size)
    side = generated[0].size[0]

    def real() -> list[Image.Image]:
        images = (s["image"].convert("RGB") for s in read_samples(shards.path, split))
        chosen = list(images if c.fid_reference_images is None else itertools.islice(images, c.fid_reference_images))
        return [im if im.size == (side, side) else im.resize((side, side), Image.BICUBIC) for im in chosen]

    digest = weights_digest(c.inception_weights)
    count = "all" if c.fid_reference_images is None else str(c.fid_reference_images)
    key = f"{shards.version}-{split}-{count}-{side}px-{digest}"
    mu_real, sigma_real, cached = reference_statistics(store.cache_dir("fid"), key, real, features)
    value = frechet_distance(*statistics(features(generated)), mu_real, sigma_real)
    return {"fid": round(value, 3), "fid_samples": len(generated),
            "fid_protocol": f"FID-{len(generated)} at {side} px against {count} {split} images of {shards.ref} "
                            f"at {side} px; Inception-v3 pool3 (torch-fidelity, weights {digest}), TF-style resize "
                            f"to 299; reference statistics {'from the cache' if cached else 'computed'}"}


def _grid(images: list[Image.Image], captions: list[str], path, per_row: int = 8) -> None:
    side = images[0].size[0]
    rows = (len(images) + per_row - 1) // per_row
    canvas = Image.new("RGB", (per_row * side, rows * (side + 28)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % per_row) * side, (i // per_row) * (side + 28)
        canvas.paste(img, (x, y))
        draw.multiline_text((x + 2, y + side + 1), "\n".join(caption_lines(cap, side, max_lines=2)), fill="black",
                            spacing=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def run(ctx: StageContext) -> Artifact:
    """Generate for `num_prompts` val captions and write the `report` artifact."""
    config, inputs = ctx.config, ctx.inputs
    c = config.evaluate
    split = "val"
    samples = []
    for s in read_samples(inputs["shards"].path, split):
        samples.append(s)
        if len(samples) == c.num_prompts:
            break
    if not samples:
        split = "train"
        samples = [s for _, s in zip(range(c.num_prompts), read_samples(inputs["shards"].path, split))]
    pipe = TextToImage.from_store(ctx.store, pins={k: inputs.get(k) for k in ("base", "superres", "decoder", "guide",
                                                                               "prior")})
    sampling = config.sampling
    if pipe.guide is None:  # no guide trained in this run: the guide scale has nothing to steer with
        sampling = sampling.model_copy(update={"guide": sampling.guide.model_copy(update={"scale": 0.0})})
    captions = [s["caption"] for s in samples]
    images, tokens_low, seconds = generate(pipe, captions, sampling, c)
    metrics: dict = {"prompts": len(images), "prompt_split": split,
                     "seconds_per_image": round(seconds / max(len(images), 1), 4)}
    rows, links, guidance = [], [], []
    is_demo = ["objects" in s["info"].get("source_info", {}) for s in samples]
    demo = [(s, img) for s, img, keep in zip(samples, images, is_demo) if keep]

    def graded(imgs: list[Image.Image]) -> dict[str, float]:
        return alignment(grade_samples([img for img, keep in zip(imgs, is_demo) if keep], [s for s, _ in demo]))

    if demo:
        per_image = grade_samples([img for _, img in demo], [s for s, _ in demo])
        metrics.update({f"alignment_{part}": value for part, value in alignment(per_image).items()})
        rows = [{"key": s["key"], "caption": s["caption"],
                 **{p: all(r[p] for r in g) for p in PARTS}}
                for (s, _), g in zip(demo, per_image)]
        # The base's own link: its samples seen through the low-res decoder, before super-res.
        base_images = to_images(pipe.decode_tokens({"tokens_low": torch.cat(tokens_low)}))
        base_images = [img for img, keep in zip(base_images, is_demo) if keep]
        links = [{"link": BASE_LINK, "images": len(base_images),
                  **alignment(grade_samples(base_images, [s for s, _ in demo]))}]
        if split == "val":  # the tokens artifact holds the val images' own tokens
            links += alignment_by_link(pipe, [s for s, _ in demo], inputs["tokens"].path, c, sampling)
    if pipe.guide is not None:
        metrics["guide_scale"] = sampling.guide.scale
        guidance = [{"guide_scale": sampling.guide.scale, "seconds_per_image": metrics["seconds_per_image"],
                     **({p: metrics[f"alignment_{p}"] for p in PARTS} if demo else {})}]
        for scale in c.guide_scales:
            if scale == sampling.guide.scale:
                continue
            steered = sampling.model_copy(update={"guide": sampling.guide.model_copy(update={"scale": scale})})
            other, _, seconds = generate(pipe, captions, steered, c)
            guidance.append({"guide_scale": scale, "seconds_per_image": round(seconds / max(len(other), 1), 4),
                             **(graded(other) if demo else {})})
            if demo:
                metrics.update({f"alignment_{p}_guide{scale:g}": guidance[-1][p] for p in PARTS})
    if pipe.prior is not None:  # unCLIP: the same prompts and seeds, the prior's image embedding added
        prior_images, _, seconds = generate(pipe, captions, sampling, c, prior=True)
        metrics["seconds_per_image_prior"] = round(seconds / max(len(prior_images), 1), 4)
        if demo:
            metrics.update({f"alignment_{p}_prior": v for p, v in graded(prior_images).items()})
    if pipe.clip is not None and demo:
        metrics.update(variation_alignment(pipe, [s for s, _ in demo], sampling, c))
    metrics.update(clip_score(images, captions, c, pipe.device, inputs.get("clip")))
    metrics.update(fid(images, inputs["shards"], split, c, ctx.store, pipe.device))
    for kind, key in (("vqgan-low", "psnr"), ("vqgan-high", "psnr"), ("decoder", "new_psnr")):
        metrics[f"{kind}_val_psnr"] = metric(inputs[kind], key)
    columns = TokensSchema.of(inputs["tokens"].path).geometry  # no seg_tokens without scene maps
    for column in ("tokens_low", "tokens_high", "seg_tokens"):
        metrics[f"{column}_codebook_usage"] = metric(inputs["tokens"], f"{column}_usage") if column in columns else None
    with ctx.commit("report") as out:
        _grid(images, captions, out.path / PREVIEW_DIR / "samples.png")
        (out.path / "samples").mkdir()
        for s, img in zip(samples, images):
            img.save(out.path / "samples" / f"{s['key']}.png")
        (out.path / "report.json").write_text(json.dumps({"metrics": metrics, "alignment_by_link": links,
                                                          "guidance": guidance,
                                                          "lineage": pipe.lineage, "prompts": rows or captions},
                                                         indent=2))
        out.metrics = metrics
        tables = {"alignment": rows, "alignment-by-link": links, "guidance": guidance}
        out.details = {"lineage": pipe.lineage, "tables": {k: v for k, v in tables.items() if v}}
    log.info("evaluate: %s", metrics)
    for link in links:
        log.info("evaluate: alignment of %s", link)
    return out.artifact
