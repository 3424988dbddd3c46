"""The pipeline's CLIP: an open_clip model sized by config, trained on the user's pairs or loaded pretrained.

`build_clip` calls `open_clip.create_model` on a named architecture with the sizes of
`train_clip.model` as overrides (the tiny preset: a small ViT and text tower that train in
minutes on CPU), or with `train_clip.pretrained` (an open_clip tag or a checkpoint path).
`Clip` wraps it for the rest of the pipeline: images in the pipeline's [-1, 1] range at any
size (resized, then normalised with open_clip's statistics) and captions as strings in,
L2-normalised embeddings out. Saved as `model.safetensors` + `config.json` like every model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import ClipArchConfig
from muse.models.saved import read_weights, save_weights

MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's (OpenAI's) image statistics
STD = (0.26862954, 0.26130258, 0.27577711)


def model_kwargs(arch: ClipArchConfig) -> dict:
    """open_clip `create_model` overrides for the sizes `arch` sets (the rest are the named model's)."""
    vision = {k: v for k, v in (("image_size", arch.image_size), ("patch_size", arch.patch_size),
                                ("width", arch.vision_width), ("layers", arch.vision_layers),
                                ("head_width", arch.vision_head_width)) if v is not None}
    text = {k: v for k, v in (("context_length", arch.context_length), ("width", arch.text_width),
                              ("heads", arch.text_heads), ("layers", arch.text_layers)) if v is not None}
    import open_clip

    base = open_clip.get_model_config(arch.name)
    if base is None:
        raise ValueError(f"train_clip.model.name {arch.name!r}: not an open_clip model (open_clip.list_models())")
    out = {}
    if arch.embed_dim is not None:
        out["embed_dim"] = arch.embed_dim
    if vision:
        out["vision_cfg"] = base["vision_cfg"] | vision
    if text:
        out["text_cfg"] = base["text_cfg"] | text
    return out


class Clip(nn.Module):
    """An open_clip CLIP with the pipeline's image range and string captions."""

    def __init__(self, arch: ClipArchConfig, pretrained: str | None = None):
        super().__init__()
        import open_clip

        self.arch = arch
        self.model = open_clip.create_model(arch.name, pretrained=pretrained,
                                            **({} if pretrained else model_kwargs(arch)))
        self.tokenizer = open_clip.get_tokenizer(arch.name)
        self.image_size = int(self.model.visual.image_size[0] if isinstance(self.model.visual.image_size, tuple)
                              else self.model.visual.image_size)
        self.context_length = int(self.model.context_length)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if self.model.text_projection is not None \
            else int(self.model.ln_final.weight.shape[0])

    def tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), context_length=self.context_length)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, dim], unit length."""
        x = (images + 1) / 2
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return self.model.encode_image((x - self.mean) / self.std, normalize=True)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Captions -> [B, dim], unit length."""
        return self.encode_tokens(self.tokens(captions).to(self.mean.device))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale


def save_clip(clip: Clip, directory, extra: dict | None = None) -> None:
    save_weights(clip, directory, {"arch": clip.arch.model_dump(mode="json"), **(extra or {})})


def load_clip(directory) -> Clip:
    """The CLIP of a `clip` artifact (or exported folder), in eval mode."""
    state, config = read_weights(directory)
    clip = Clip(ClipArchConfig.model_validate(config["arch"]))
    clip.load_state_dict(state)
    return clip.eval()
