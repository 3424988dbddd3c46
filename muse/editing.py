"""Editing in token space: inpainting, outpainting, mask-free editing, and scene-conditioned generation.

Muse edits an image by resampling some of its tokens under a prompt and keeping the rest.
  - Inpainting: the tokens under a mask become [MASK] and the sampler fills them; every other
    token of the image is kept bit-identical.
  - Outpainting: the image shrinks onto a canvas of its own size and the margin is inpainted.
  - img2img (diffusers' `AmusedImg2ImgPipeline`): a strength S re-masks random tokens, as many as
    the schedule has masked `round(S * steps)` steps before its end, and decodes those steps.
  - Mask-free editing: score each of the image's tokens by its likelihood under the new prompt
    (each token predicted with a quarter of the grid masked, as in training), re-mask the least
    likely share, resample it, and repeat; the image changes where it disagrees with the prompt.
Base tokens are edited first. Super-res tokens keep the image's own high-res tokens except under
the mask and over every base token that changed, which are resampled given the edited base tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from muse.config import SamplingConfig
from muse.datasets.labels import boundaries
from muse.generate import TextToImage
from muse.masking import masked_after_step
from muse.models.vqgan import VQModel
from muse.sampling import guided_logits

OUTPAINT_SIDES = ("all", "left", "right", "top", "bottom")


def image_tokens(vq: VQModel, image: Image.Image) -> torch.Tensor:
    """An image's token ids [1, side * side] at the tokenizer's resolution (bicubic resize, as in training)."""
    res = vq.cfg.resolution
    img = image.convert("RGB")
    if img.size != (res, res):
        img = img.resize((res, res), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(127.5).sub(1)
    device = next(vq.parameters()).device
    _, codes, _ = vq.encode(x[None].to(device))
    return codes.reshape(1, -1)


def token_mask(mask: Image.Image, side: int) -> torch.Tensor:
    """A pixel mask (white = edit) -> [1, side * side] bool: a token is edited when any of its pixels is."""
    pixels = torch.from_numpy(np.asarray(mask.convert("L")) > 127).float()[None, None]
    if not pixels.any():
        raise ValueError("the mask is empty: paint the region to edit white (pixel values > 127)")
    return F.adaptive_max_pool2d(pixels, side).bool().reshape(1, -1)


def outpaint_canvas(image: Image.Image, fraction: float, side: str = "all") -> tuple[Image.Image, Image.Image]:
    """Shrink the image by `fraction` onto a same-size canvas, against the side opposite `side` (centred for
    "all"); returns (canvas, mask) with the new margin white in the mask."""
    if not 0 < fraction < 1:
        raise ValueError(f"outpaint fraction must be in (0, 1), got {fraction}")
    if side not in OUTPAINT_SIDES:
        raise ValueError(f"outpaint side {side!r}: choose one of {', '.join(OUTPAINT_SIDES)}")
    img = image.convert("RGB")
    w, h = img.size
    sw, sh = max(1, round(w * (1 - fraction))), max(1, round(h * (1 - fraction)))
    x = {"left": w - sw, "right": 0}.get(side, (w - sw) // 2)
    y = {"top": h - sh, "bottom": 0}.get(side, (h - sh) // 2)
    mean = tuple(int(c) for c in np.asarray(img).reshape(-1, 3).mean(0))
    canvas = Image.new("RGB", (w, h), mean)  # the margin's pixels are never read: its tokens are resampled
    canvas.paste(img.resize((sw, sh), Image.Resampling.LANCZOS), (x, y))
    mask = Image.new("L", (w, h), 255)
    mask.paste(0, (x, y, x + sw, y + sh))
    return canvas, mask


def scene_tokens(vq_seg: VQModel, labels: np.ndarray, edges: np.ndarray | None = None) -> torch.Tensor:
    """A label map [H, W] of label-space ids (+ optional edge map) -> scene token ids [1, n] via the scene
    tokenizer; without an edge map, edges are the label boundaries."""
    num_labels = vq_seg.encoder.net[0].in_channels - 1
    if labels.max() >= num_labels or labels.min() < 0:
        raise ValueError(f"label map has ids outside the scene tokenizer's label space 0..{num_labels - 1}")
    if edges is None:
        edges = boundaries(labels)
    res = vq_seg.cfg.resolution
    lab = Image.fromarray(labels.astype(np.int32)).resize((res, res), Image.Resampling.NEAREST)
    edg = Image.fromarray((edges > 0).astype(np.uint8) * 255).resize((res, res), Image.Resampling.NEAREST)
    onehot = F.one_hot(torch.from_numpy(np.asarray(lab).astype(np.int64)), num_labels).permute(2, 0, 1).float()
    x = torch.cat([onehot, torch.from_numpy(np.asarray(edg) > 127).float()[None]])
    device = next(vq_seg.parameters()).device
    _, codes, _ = vq_seg.encode(x[None].to(device))
    return codes.reshape(1, -1)


@torch.no_grad()
def token_log_likelihood(pipe: TextToImage, model, tokens: torch.Tensor, prompt: str, negative: str | None,
                         guidance_scale: float, generator: torch.Generator, groups: int = 4,
                         cond: torch.Tensor | None = None, micro: dict[str, float] | None = None) -> torch.Tensor:
    """log p(token | prompt, the other tokens) for every position [1, N], under the guided logits (`micro`: the
    micro-conditions asked, see `TextToImage.micro_values`). Positions are
    split at random into `groups`; each group is masked in turn (a 1/groups mask rate, as the model trained on)."""
    n = tokens.shape[1]
    with pipe.precision():
        negatives = None if negative is None else [negative]
        memory, mask, u_memory, u_mask = pipe.guidance_memories(model, [prompt], negatives, cond,
                                                                micro=pipe.micro_values(model, micro))
        mem, mem_mask = torch.cat([memory, u_memory]), torch.cat([mask, u_mask])
        kv = model.memory_kv(mem)
        group = torch.randperm(n, generator=generator, device=tokens.device) % groups
        score = torch.empty(1, n, device=tokens.device)
        for g in range(groups):
            hidden = (group == g)[None]
            masked = tokens.masked_fill(hidden, model.spec.mask_id)
            logits = model(torch.cat([masked, masked]), mem, mem_mask, kv).float()
            logp = F.log_softmax(guided_logits(logits[:1], logits[1:], guidance_scale), -1)
            score = torch.where(hidden, logp.gather(-1, tokens[..., None])[..., 0], score)
    return score


def img2img_mask(n: int, strength: float, steps: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """diffusers' `AmusedImg2ImgPipeline` semantics: a `strength` S in [0, 1] starts decoding at step
    `steps - round(S * steps)` of the schedule. Returns the [1, n] mask of the tokens to resample (random
    positions, as many as the cosine schedule still has masked there) and the steps left to sample them in."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    left = round(strength * steps)
    start = steps - left
    count = n if start == 0 else masked_after_step(start - 1, steps, n)
    order = torch.rand(n, generator=generator, device=generator.device).argsort()
    mask = torch.zeros(1, n, dtype=torch.bool, device=generator.device)
    mask[0, order[:count]] = True
    return mask, left


def _low_to_high(changed: torch.Tensor, low_side: int, high_side: int) -> torch.Tensor:
    """[1, low_side^2] bool -> [1, high_side^2] bool: every high-res token under a changed base token."""
    grid = changed.float().reshape(1, 1, low_side, low_side)
    return F.interpolate(grid, size=(high_side, high_side), mode="nearest").bool().reshape(1, -1)


@torch.no_grad()
def edit_tokens(pipe: TextToImage, image: Image.Image, prompt: str, mask: Image.Image | None = None,
                negative: str | None = None, seed: int = 0, superres: bool = True, mask_free_iterations: int = 6,
                mask_free_fraction: float = 0.15, sampling: SamplingConfig | None = None, steps: int | None = None,
                superres_steps: int | None = None, guidance_scale: float | None = None,
                superres_guidance_scale: float | None = None, guide_scale: float | None = None,
                strength: float | None = None) -> dict[str, torch.Tensor]:
    """Edited token grids of one image: inpaint where `mask` is white; img2img with `strength` (re-mask that
    share of the schedule's tokens at random and decode from there: 0 keeps the image's tokens, 1 generates
    anew); or edit mask-free when neither is given, sampled with `pipe.resolve_sampling(sampling, steps, ...)` (mask-free splits the base steps over its rounds).
    Returns tokens_low (and tokens_high with super-res) plus the original grids as `original_low/high`."""
    sampling = pipe.resolve_sampling(sampling, steps, superres_steps, guidance_scale, superres_guidance_scale,
                                     guide_scale)
    sampler, steps, guide, micro = sampling.base, sampling.base.steps, sampling.guide, sampling.micro
    gen = torch.Generator(pipe.device).manual_seed(seed)
    neg = None if negative is None else [negative]
    low_side = pipe.vq_low.cfg.token_side
    original_low = image_tokens(pipe.vq_low, image)
    mask_id = pipe.base.spec.mask_id
    if mask is not None and strength is not None:
        raise ValueError("choose a mask (inpainting) or a strength (img2img), not both")
    if mask is not None:
        edit = token_mask(mask, low_side).to(pipe.device)
        low = pipe.sample_tokens(pipe.base, [prompt], neg, sampler, gen, tokens=original_low.masked_fill(edit, mask_id),
                                 guide=guide, micro=micro)
    elif strength is not None:
        edit, left = img2img_mask(original_low.shape[1], strength, steps, gen)
        low = original_low
        if edit.any():
            low = pipe.sample_tokens(pipe.base, [prompt], neg, sampler.model_copy(update={"steps": left}), gen,
                                     tokens=original_low.masked_fill(edit, mask_id), guide=guide, micro=micro)
    else:
        if not 0 < mask_free_fraction < 1:
            raise ValueError(f"mask_free_fraction must be in (0, 1), got {mask_free_fraction}")
        low = original_low
        k = max(1, round(mask_free_fraction * low.shape[1]))
        per_round = max(2, steps // max(1, mask_free_iterations))
        for _ in range(mask_free_iterations):
            score = token_log_likelihood(pipe, pipe.base, low, prompt, negative, sampler.guidance_scale, gen,
                                         micro=micro)
            worst = torch.zeros_like(low, dtype=torch.bool)
            worst[0, score[0].argsort()[:k]] = True
            low = pipe.sample_tokens(pipe.base, [prompt], neg, sampler.model_copy(update={"steps": per_round}), gen,
                                     tokens=low.masked_fill(worst, mask_id), guide=guide, micro=micro)
    out = {"tokens_low": low, "original_low": original_low}
    if superres and pipe.superres is not None:
        high_side = pipe.vq_high.cfg.token_side
        original_high = image_tokens(pipe.vq_high, image)
        redo = _low_to_high(low != original_low, low_side, high_side)
        if mask is not None:
            redo |= token_mask(mask, high_side).to(pipe.device)
        out["original_high"] = original_high
        out["tokens_high"] = original_high
        if redo.any():
            out["tokens_high"] = pipe.sample_tokens(pipe.superres, [prompt], neg, sampling.superres,
                                                    gen, cond=low, tokens=original_high.masked_fill(redo, mask_id),
                                                    micro=micro)
    return out
