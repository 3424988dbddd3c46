"""Text -> image from trained artifacts: base tokens -> super-res tokens -> (finetuned) decoder -> PIL.

`TextToImage.from_store(store)` loads `base`, `superres` (when present), the tokenizers named in
their configs, the text encoder they were trained with, and the `decoder` artifact when one
was finetuned for that `vqgan-high` version. `lineage` says which versions produced an image;
`sampling` holds the sampler settings the transformers were trained with, the default of
every call. A `guide` artifact trained for the loaded base is loaded too: with a non-zero
`sampling.guide.scale` it steers the base pass (`muse.guidance`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import ConfigError, GuideSamplingConfig, SamplerConfig, SamplingConfig
from muse.contracts import TransformerRecord
from muse.distributed import autocast
from muse.guidance import steer
from muse.lora import load_trained
from muse.micro_conditions import NAMES as MICRO_NAMES
from muse.models.clip import Clip, load_clip
from muse.models.guide import GuideHead, load_guide
from muse.models.prior import Prior, load_prior
from muse.models.text import pooled_text
from muse.models.text import load_text_encoder
from muse.models.transformer import MaskedTransformer
from muse.models.vqgan import from_pretrained, load_decoder
from muse.sampling import decode


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> [3, H, W] in [-1, 1] (the inverse of `to_images`)."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1


class TextToImage:
    """Captions -> images with a store's trained artifacts: the inference path (the "pipeline" is the DAG)."""

    def __init__(self, store: ArtifactStore, device: torch.device | str | None = None,
                 pins: dict[str, Artifact | None] | None = None):
        """`pins` fixes artifacts by kind (base, superres, decoder, guide, prior; a guide or prior pinned to None:
        none); the rest are the store's latest."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pins = pins or {}
        base = pins.get("base") or store.get("base")
        self.base = load_trained(store, base)
        self.base.to(self.device)
        record = TransformerRecord.of(base.path)
        self.micro_defaults = {"base": record.micro_defaults or {}, "superres": {}}  # medians of the training rows
        self.sampling = SamplingConfig(base=record.sampling or SamplingConfig().base)
        self.lineage = {"base": base.version}
        self.clip: Clip | None = None  # embeds images for a base trained on CLIP image embeddings
        if record.clip is not None:
            clip = store.resolve(record.clip)
            self.clip = load_clip(clip.path).to(self.device)
            self.lineage["clip"] = clip.version
        self.prior: Prior | None = None  # caption -> image embedding, for a base trained on image embeddings
        prior = pins["prior"] if "prior" in pins else (store.get("prior") if store.latest_version("prior") else None)
        if self.clip is not None and prior is not None:
            model, prior_config = load_prior(prior.path)
            if prior_config["clip"] == record.clip:
                self.prior = model.to(self.device)
                self.lineage["prior"] = prior.version
        self.text = load_text_encoder(record.text_encoder, self.device)
        self.max_length = record.max_length or self.text.max_length
        low = store.resolve(record.tokenizers["tokens_low"])
        self.vq_low = from_pretrained(low.path).to(self.device)
        self.lineage["vqgan-low"] = low.version
        self.vq_seg = None  # the scene tokenizer, when the base model was trained with scene tokens
        if record.scene:
            seg = store.resolve(record.tokenizers["seg_tokens"])
            self.vq_seg = from_pretrained(seg.path).to(self.device)
            self.lineage["vqseg"] = seg.version
        self.guide: GuideHead | None = None
        guide = pins["guide"] if "guide" in pins else (store.get("guide") if store.latest_version("guide") else None)
        if guide is not None and guide.manifest.inputs.get("base") == base.version:
            self.guide, guide_config = load_guide(guide.path)
            self.guide.to(self.device)
            self.sampling = self.sampling.model_copy(
                update={"guide": GuideSamplingConfig.model_validate(guide_config["sampling"])})
            self.lineage["guide"] = guide.version
        self.superres: MaskedTransformer | None = None
        self.decoder = None
        if "superres" in pins or store.latest_version("superres") is not None:
            sr = pins.get("superres") or store.get("superres")
            self.superres = load_trained(store, sr)
            self.superres.to(self.device)
            sr_record = TransformerRecord.of(sr.path)
            self.micro_defaults["superres"] = sr_record.micro_defaults or {}
            self.sampling = self.sampling.model_copy(
                update={"superres": sr_record.sampling or SamplingConfig().superres})
            high = store.resolve(sr_record.tokenizers["tokens_high"])
            self.vq_high = from_pretrained(high.path).to(self.device)
            self.lineage.update({"superres": sr.version, "vqgan-high": high.version})
            dec = pins.get("decoder") or (store.get("decoder") if store.latest_version("decoder") else None)
            if dec is not None and dec.manifest.inputs.get("vqgan-high") == high.version:
                self.decoder = load_decoder(dec.path).to(self.device)
                self.lineage["decoder"] = dec.version

    def resolve_sampling(self, sampling: SamplingConfig | None = None, steps: int | None = None,
                         superres_steps: int | None = None, guidance_scale: float | None = None,
                         superres_guidance_scale: float | None = None,
                         guide_scale: float | None = None, micro: dict[str, float] | None = None) -> SamplingConfig:
        """`sampling` (default: the trained transformers' own settings) with the given knobs replaced (`micro`:
        merged over its micro-conditions)."""
        sampling = sampling or self.sampling
        base = {k: v for k, v in (("steps", steps), ("guidance_scale", guidance_scale)) if v is not None}
        sr = {k: v for k, v in (("steps", superres_steps), ("guidance_scale", superres_guidance_scale)) if v is not None}
        guide = {} if guide_scale is None else {"scale": guide_scale}
        return SamplingConfig(base=sampling.base.model_copy(update=base), superres=sampling.superres.model_copy(update=sr),
                              guide=sampling.guide.model_copy(update=guide), micro=sampling.micro | (micro or {}))

    @classmethod
    def from_store(cls, store: ArtifactStore, device: torch.device | str | None = None,
                   pins: dict[str, Artifact | None] | None = None) -> "TextToImage":
        return cls(store, device, pins)

    def micro_values(self, model: MaskedTransformer, asked: dict[str, float]) -> torch.Tensor | None:
        """[1, 5] micro-conditions for `model`: those asked, else its training rows' medians (NaN: unknown); None
        for a model trained without them."""
        if not model.spec.micro_conditions:
            return None
        defaults = self.micro_defaults["base" if model is self.base else "superres"]
        values = [asked[n] if n in asked else defaults[n] if defaults.get(n) is not None else math.nan
                  for n in MICRO_NAMES]
        return torch.tensor([values], device=self.device)

    def _memory(self, model: MaskedTransformer, prompts: list[str], cond: torch.Tensor | None = None,
                drop: bool = False, scene: torch.Tensor | None = None, micro: torch.Tensor | None = None,
                image_emb: torch.Tensor | None = None):
        emb, mask = self.text.encode(prompts)
        length = min(emb.shape[1], self.max_length)
        # Pad to max_length so prompt and negative-prompt memories batch together (padding is masked).
        padded = torch.zeros(emb.shape[0], self.max_length, emb.shape[2], device=self.device)
        padded[:, :length] = emb[:, :length]
        full_mask = torch.zeros(emb.shape[0], self.max_length, dtype=torch.bool, device=self.device)
        full_mask[:, :length] = mask[:, :length]
        emb, mask = padded, full_mask
        if drop:
            mask = torch.zeros_like(mask)
        else:  # an empty prompt is no caption: its text is dropped, as in training (not CLS/SEP embedded)
            empty = torch.tensor([not p.strip() for p in prompts], device=mask.device)
            mask = mask & ~empty[:, None]
        if scene is not None:
            scene = scene.expand(emb.shape[0], -1)
        if micro is not None:
            micro = micro.expand(emb.shape[0], -1)
        return model.memory(emb, mask, cond, scene, micro, image_emb)

    def sample_tokens(self, model: MaskedTransformer, prompts: list[str], negative: list[str] | None,
                      cfg: SamplerConfig, generator: torch.Generator, cond: torch.Tensor | None = None,
                      tokens: torch.Tensor | None = None, scene: torch.Tensor | None = None,
                      guide: GuideSamplingConfig | None = None, micro: dict[str, float] | None = None,
                      image_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Token grids by iterative decoding; the scene (a layout) conditions both guidance branches, only the text
        is dropped. `guide` (base model only) steers the pass with this pipeline's guide head; `micro`: the
        micro-conditions asked (`micro_values`); `image_emb` [B, dim]: CLIP image embeddings for a model trained on
        them, in the conditional branch only."""
        scale = 0.0 if guide is None else guide.scale
        if scale and (self.guide is None or model is not self.base):
            raise ConfigError("sampling.guide.scale: no guide for this model (run `muse run train-guide` for the base)")
        with self.precision(), steer(model, self.guide, self.guide_condition(prompts, guide), scale):
            memories = self.guidance_memories(model, prompts, negative, cond, scene, self.micro_values(model, micro or {}),
                                              image_emb if model.spec.image_dim else None)
            return decode(model, *memories, cfg, generator, tokens)

    def guide_condition(self, prompts: list[str], guide: GuideSamplingConfig | None) -> torch.Tensor | None:
        """What the guide steers each prompt's image towards: its pooled caption embedding, the class id of
        `guide.label`, or nothing (a score)."""
        if self.guide is None or guide is None or not guide.scale:
            return None
        spec = self.guide.spec
        if spec.target == "caption":
            emb, mask = self.text.encode(prompts)
            return pooled_text(emb[:, :self.max_length], mask[:, :self.max_length])
        if spec.target == "label":
            if guide.label not in spec.classes:
                raise ConfigError(f"sampling.guide.label: {guide.label!r} is not a class of this guide; "
                                  f"choose from {', '.join(spec.classes)}")
            return torch.full((len(prompts),), spec.classes.index(guide.label), device=self.device)
        return None

    def guidance_memories(self, model: MaskedTransformer, prompts: list[str], negative: list[str] | None,
                          cond: torch.Tensor | None = None, scene: torch.Tensor | None = None,
                          micro: torch.Tensor | None = None, image_emb: torch.Tensor | None = None):
        """(memory, mask, uncond memory, uncond mask) for classifier-free guidance: the negative prompts' memory
        is the unconditional branch when given, else the prompts' memory with the text dropped; the scene and the
        micro-conditions condition both, an image embedding only the first."""
        memory, mask = self._memory(model, prompts, cond, scene=scene, micro=micro, image_emb=image_emb)
        if negative is not None:
            u_memory, u_mask = self._memory(model, negative, cond, scene=scene, micro=micro)
        else:
            u_memory, u_mask = self._memory(model, prompts, cond, drop=True, scene=scene, micro=micro)
        return memory, mask, u_memory, u_mask

    def precision(self) -> torch.autocast:
        """Transformer passes in bf16 autocast on a GPU (as they trained), fp32 on CPU; the sampler reads the
        logits in fp32 either way."""
        return autocast(self.device)

    @torch.no_grad()
    def generate_tokens(self, prompts: list[str], negative: list[str] | None = None, seed: int = 0,
                        sampling: SamplingConfig | None = None, steps: int | None = None,
                        superres_steps: int | None = None, guidance_scale: float | None = None,
                        superres_guidance_scale: float | None = None, guide_scale: float | None = None,
                        superres: bool = True, scene: torch.Tensor | None = None,
                        tokens_low: torch.Tensor | None = None,
                        micro: dict[str, float] | None = None,
                        image_emb: torch.Tensor | None = None, prior: bool = False) -> dict[str, torch.Tensor]:
        """Base (then super-res) token grids for the prompts, sampled with `resolve_sampling(sampling, steps, ...)`;
        `scene` is [1, n] scene tokens (see `muse.editing.scene_tokens`) laid out for every prompt, for a base
        model trained with them. `tokens_low` [B, n]: upsample these low-res grids (e.g. a real image's) instead
        of sampling the base. `image_emb` [B, dim]: CLIP image embeddings (`image_embeddings`) for a base trained
        with `image_conditioning`; `prior`: take them from the prior for the prompts (unCLIP)."""
        if prior:
            image_emb = self.prior_embeddings(prompts)
        if image_emb is not None and not self.base.spec.image_dim:
            raise ValueError("this base model was trained without image embeddings (train_base.image_conditioning)")
        if scene is not None and self.vq_seg is None:
            raise ValueError("this base model was trained without scene tokens (train_base.scene_conditioning: false)")
        sampling = self.resolve_sampling(sampling, steps, superres_steps, guidance_scale, superres_guidance_scale,
                                         guide_scale, micro)
        gen = torch.Generator(self.device).manual_seed(seed)
        if tokens_low is None:
            low = self.sample_tokens(self.base, prompts, negative, sampling.base, gen, scene=scene,
                                     guide=sampling.guide, micro=sampling.micro, image_emb=image_emb)
        else:
            side = self.vq_low.cfg.token_side
            if tuple(tokens_low.shape) != (len(prompts), side * side):
                raise ValueError(f"tokens_low has shape {tuple(tokens_low.shape)}; this pipeline's low-res grids are "
                                 f"[{len(prompts)} prompts, {side * side}]")
            low = tokens_low.to(self.device)
        out = {"tokens_low": low}
        if superres and self.superres is not None:
            sr_scene = scene if self.superres.spec.scene_codebook_size else None
            out["tokens_high"] = self.sample_tokens(self.superres, prompts, negative, sampling.superres, gen, cond=low,
                                                    scene=sr_scene, micro=sampling.micro, image_emb=image_emb)
        return out

    @torch.no_grad()
    def decode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        if "tokens_high" in tokens:
            side = self.vq_high.cfg.token_side
            codes = tokens["tokens_high"].view(-1, side, side)
            if self.decoder is not None:
                return self.decoder(self.vq_high.codes_to_latents(codes))
            return self.vq_high.decode_codes(codes)
        side = self.vq_low.cfg.token_side
        return self.vq_low.decode_codes(tokens["tokens_low"].view(-1, side, side))

    def __call__(self, prompts: list[str], **kwargs) -> list[Image.Image]:
        return to_images(self.decode_tokens(self.generate_tokens(prompts, **kwargs)))

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, dim] unit CLIP embeddings of images, under the CLIP the base was trained with."""
        if self.clip is None:
            raise ValueError("this base model was trained without image embeddings (train_base.image_conditioning)")
        return self.clip.encode_images(torch.stack([pil_to_tensor(i.convert("RGB")) for i in images]).to(self.device))

    @torch.no_grad()
    def prior_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """[B, dim] the prior's CLIP image embeddings for the prompts."""
        if self.prior is None:
            raise ValueError("no prior for this base (train_prior.enabled, with train_base.image_conditioning)")
        emb, mask = self.text.encode(prompts)
        return self.prior(pooled_text(emb[:, :self.max_length], mask[:, :self.max_length]))

    def vary(self, image: Image.Image, n: int = 4, prompt: str = "", seed: int = 0, **kwargs) -> list[Image.Image]:
        """`n` variations of an image (DALL-E 2): samples conditioned on its CLIP embedding (and `prompt`)."""
        emb = self.image_embeddings([image]).expand(n, -1)
        return to_images(self.decode_tokens(self.generate_tokens([prompt] * n, seed=seed, image_emb=emb, **kwargs)))

    @torch.no_grad()
    def text_diff(self, image: Image.Image, before: str, after: str, amount: float = 0.5, prompt: str = "",
                  seed: int = 0, **kwargs) -> Image.Image:
        """DALL-E 2's text-diff edit: the image's CLIP embedding turned by slerp a fraction `amount` of the way
        towards the normalised difference of the two captions' CLIP text embeddings, then decoded."""
        if self.clip is None:
            raise ValueError("this base model was trained without image embeddings (train_base.image_conditioning)")
        emb = self.image_embeddings([image])[0]
        diff = torch.nn.functional.normalize(self.clip.encode_captions([after])[0] - self.clip.encode_captions([before])[0],
                                             dim=0)
        edited = slerp(emb, diff, amount)[None]
        return to_images(self.decode_tokens(self.generate_tokens([prompt], seed=seed, image_emb=edited, **kwargs)))[0]

    def interpolate(self, a: Image.Image, b: Image.Image, steps: int = 5, prompt: str = "", seed: int = 0,
                    **kwargs) -> list[Image.Image]:
        """Images along the spherical path between two images' CLIP embeddings, one seed for all (DALL-E 2 3.2)."""
        ea, eb = self.image_embeddings([a, b])
        emb = torch.stack([slerp(ea, eb, t) for t in torch.linspace(0, 1, steps).tolist()])
        out = []
        for e in emb:  # one seed per image: only the embedding moves
            out += to_images(self.decode_tokens(self.generate_tokens([prompt], seed=seed, image_emb=e[None],
                                                                     **kwargs)))
        return out


Pipeline = TextToImage  # the name before 2026-12-02, kept for code written against it


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The point a fraction t along the great circle from unit vector a to unit vector b."""
    omega = torch.arccos((a * b).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
