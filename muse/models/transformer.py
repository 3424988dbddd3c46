"""The masked token transformer of Muse: base (text -> low-res tokens) and super-res (+ low-res tokens).

Image tokens (plus a [MASK] id = codebook_size) are embedded with learned row and column
position embeddings, pass N pre-norm blocks of self-attention, cross-attention to the
conditioning memory and an MLP, and a linear head predicts codebook logits everywhere.

The memory is: one learned null token (always visible, so a sample without text still has
something to attend to), the projected text embeddings (masked by their padding; all of
them hidden when text is dropped for classifier-free guidance), then, for super-res, the
low-res tokens after a small transformer encoder, optionally scene tokens, optionally one
CLIP image-embedding token (DALL-E 2's image latent), and optionally one global token (aMUSEd's pooled conditioning): the pooled caption embedding (hidden with the
text) and the image's micro-conditions (`muse.micro_conditions`), projected together. With
`cond_aligned`, the encoded low-res grid is also upsampled (nearest) to the high-res grid
and added to the input embeddings, so each position sees the coarse token it refines.
With `patch` p > 1 (aMUSEd's U-ViT downsampling), each p x p block of input embeddings is
merged into one position before the blocks and split back after them, so attention and the
MLPs run on side/p x side/p positions; each token's logits read its block's output plus its
own input embedding. Attention is `scaled_dot_product_attention`; `memory_kv` lets a
sampler compute each block's cross-attention keys and values once per image instead of
once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muse.micro_conditions import FOURIER_DIM, fourier, indices
from muse.models.saved import read_weights, save_weights
from muse.models.text import pooled_text


@dataclass(frozen=True)
class TransformerSpec:
    """Everything that fixes the architecture (saved next to the weights)."""

    dim: int
    depth: int
    heads: int
    codebook_size: int
    side: int  # token grid side
    text_dim: int
    cond_codebook_size: int = 0  # super-res: low-res codebook (0 = base model)
    cond_levels: tuple[int, ...] = ()  # super-res: the low-res tokenizer's fsq levels (ids embedded per level)
    cond_side: int = 0
    cond_depth: int = 2
    cond_aligned: bool = False  # super-res: add the upsampled low-res encoding to the input embeddings
    cond_upsample: str = "nearest"  # cond_aligned: "nearest" copies each low-res vector; "subpixel" learns each
    # high-res position's own projection of its low-res token and their 3x3 neighbourhood (conv + pixel shuffle)
    scene_codebook_size: int = 0  # optional scene tokens (0 = off)
    scene_side: int = 0
    mlp_ratio: int = 4
    pooled_text: bool = False  # the global token holds the pooled caption embedding
    micro_conditions: tuple[str, ...] = ()  # ... and these micro-condition groups (muse.micro_conditions.GROUPS)
    image_dim: int = 0  # width of the CLIP image embedding given as one memory token (0 = none)
    patch: int = 1  # token positions merged per side before the blocks (1 = none; aMUSEd's U-ViT downsampling)

    @property
    def global_width(self) -> int:
        """Input width of the global token's projection; 0 = no global token."""
        return (self.text_dim if self.pooled_text else 0) + FOURIER_DIM * len(indices(self.micro_conditions))

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def block_side(self) -> int:
        """Side of the grid the blocks run on."""
        return self.side // self.patch


class Attention(nn.Module):
    """Multi-head attention: self-attention with one fused q/k/v projection, or cross-attention to `context`
    (q from x, k/v from the memory, so the sampler can cache the memory's keys and values)."""

    def __init__(self, dim: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads, self.is_cross = heads, cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(dim, 2 * dim, bias=False)
        else:  # one GEMM instead of two: small widths on CPU are launch-bound
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _heads(self, t: torch.Tensor, parts: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, parts, self.heads, -1).permute(2, 0, 3, 1, 4)

    def kv_of(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(self.kv(context), 2)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, d = x.shape
        if not self.is_cross:
            q, k, v = self._heads(self.qkv(x), 3)
        else:
            q = self._heads(self.q(x), 1)[0]
            k, v = kv if kv is not None else self.kv_of(context)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm self-attention, (optional) cross-attention to the memory, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, cross: bool = True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.cross = Attention(dim, heads, cross=True) if cross else None
        self.norm2 = nn.LayerNorm(dim) if cross else None
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, memory=None, memory_mask=None, kv=None):
        x = x + self.attn(self.norm1(x))
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), memory, memory_mask, kv)
        return x + self.mlp(self.norm3(x))


class LevelEmbedding(nn.Module):
    """FSQ ids -> vectors: one small table per quantized dimension, summed over the id's levels.

    An FSQ id is a mixed-radix number whose digits are the levels of its dimensions; ids that
    share a level share that level's vector, so every id is embedded well after a few hundred
    steps, where a full table (one row per id, most rows seen rarely) is still mostly noise.
    """

    def __init__(self, levels: tuple[int, ...], dim: int):
        super().__init__()
        radix = torch.tensor(levels)
        self.register_buffer("radix", radix, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), radix[:-1]]), 0),
                             persistent=False)
        self.register_buffer("offset", torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), radix[:-1]]), 0),
                             persistent=False)
        self.table = nn.Embedding(int(radix.sum()), dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        digits = (ids[..., None] // self.basis) % self.radix
        return self.table(digits + self.offset).sum(-2)


class GridEmbedding(nn.Module):
    """Token ids on a side x side grid -> vectors: token embedding + learned row and column embeddings
    (`levels`: the ids are FSQ codes, embedded per level)."""

    def __init__(self, vocab: int, side: int, dim: int, levels: tuple[int, ...] = ()):
        super().__init__()
        self.side = side
        self.tok = LevelEmbedding(levels, dim) if levels else nn.Embedding(vocab, dim)
        self.row = nn.Parameter(torch.randn(side, 1, dim) * 0.02)
        self.col = nn.Parameter(torch.randn(1, side, dim) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + (self.row + self.col).view(1, self.side * self.side, -1)


class MaskedTransformer(nn.Module):
    """Logits over the codebook for every position of a (partly masked) token grid."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.spec = spec
        d = spec.dim
        self.embed = GridEmbedding(spec.codebook_size + 1, spec.side, d)
        if spec.patch > 1:
            if spec.side % spec.patch:
                raise ValueError(f"patch {spec.patch} does not divide the token side {spec.side}")
            self.merge = nn.Linear(d * spec.patch ** 2, d)  # each patch x patch block of embeddings -> one position
            self.split = nn.Linear(d, d * spec.patch ** 2)  # and back: one vector per token of the block
        self.null = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.text_proj = nn.Sequential(nn.LayerNorm(spec.text_dim), nn.Linear(spec.text_dim, d))
        if spec.cond_codebook_size:
            self.cond_embed = GridEmbedding(spec.cond_codebook_size, spec.cond_side, d, tuple(spec.cond_levels))
            self.cond_blocks = nn.ModuleList(Block(d, spec.heads, spec.mlp_ratio, cross=False)
                                             for _ in range(spec.cond_depth))
            if spec.cond_aligned:
                if spec.side % spec.cond_side:
                    raise ValueError(f"cond_aligned needs the token side {spec.side} to be a multiple of the "
                                     f"low-res side {spec.cond_side}")
                factor = spec.side // spec.cond_side
                self.cond_to_input = nn.Conv2d(d, d * factor ** 2, 3, padding=1) \
                    if spec.cond_upsample == "subpixel" else nn.Linear(d, d)
        if spec.scene_codebook_size:
            self.scene_embed = GridEmbedding(spec.scene_codebook_size, spec.scene_side, d)
        if spec.image_dim:
            self.image_proj = nn.Sequential(nn.LayerNorm(spec.image_dim), nn.Linear(spec.image_dim, d))
        if spec.global_width:
            self.global_proj = nn.Sequential(nn.Linear(spec.global_width, d), nn.SiLU(), nn.Linear(d, d))
        self.memory_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(Block(d, spec.heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, spec.codebook_size)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def memory(self, text_emb: torch.Tensor, text_mask: torch.Tensor, cond_tokens: torch.Tensor | None = None,
               scene_tokens: torch.Tensor | None = None,
               micro: torch.Tensor | None = None, image_emb: torch.Tensor | None = None,
               image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention memory and its mask (True = attend). Drop text by passing an all-False text_mask
        (the pooled caption goes with it); scene tokens of -1 (no scene) are hidden; `micro` [B, 5] are the
        micro-conditions in `muse.micro_conditions.NAMES` order (read when the spec names some); `image_emb`
        [B, image_dim] a CLIP image embedding per sample, hidden where `image_mask` is False (or when None)."""
        b = text_emb.shape[0]
        parts = [self.null.expand(b, -1, -1)]
        masks = [torch.ones(b, 1, dtype=torch.bool, device=text_emb.device)]
        if self.spec.cond_codebook_size:  # right after the null token: `forward` finds it at a fixed place
            if cond_tokens is None:
                raise ValueError("a super-res transformer needs cond_tokens (the low-res tokens)")
            c = self.cond_embed(cond_tokens)
            for block in self.cond_blocks:
                c = block(c)
            parts.append(c)
            masks.append(torch.ones(c.shape[:2], dtype=torch.bool, device=c.device))
        parts.append(self.text_proj(text_emb))
        masks.append(text_mask.bool())
        if self.spec.scene_codebook_size and scene_tokens is not None:
            present = scene_tokens >= 0
            parts.append(self.scene_embed(scene_tokens.clamp_min(0)))
            masks.append(present)
        if self.spec.image_dim:
            if image_emb is None:
                image_emb = torch.zeros(b, self.spec.image_dim, device=text_emb.device)
                image_mask = torch.zeros(b, dtype=torch.bool, device=text_emb.device)
            parts.append(self.image_proj(image_emb.to(text_emb.device, text_emb.dtype))[:, None])
            masks.append((torch.ones(b, dtype=torch.bool, device=text_emb.device) if image_mask is None
                          else image_mask.to(text_emb.device))[:, None])
        if self.spec.global_width:
            parts.append(self.global_proj(self._global_features(text_emb, text_mask, micro))[:, None])
            masks.append(torch.ones(b, 1, dtype=torch.bool, device=text_emb.device))
        return self.memory_norm(torch.cat(parts, 1)), torch.cat(masks, 1)

    def _global_features(self, text_emb: torch.Tensor, text_mask: torch.Tensor,
                         micro: torch.Tensor | None) -> torch.Tensor:
        features = []
        if self.spec.pooled_text:
            features.append(pooled_text(text_emb, text_mask))  # zeros where the text is dropped
        if self.spec.micro_conditions:
            if micro is None:
                raise ValueError(f"this transformer is micro-conditioned on {list(self.spec.micro_conditions)}: "
                                 "pass micro [B, 5]")
            features.append(fourier(micro[:, indices(self.spec.micro_conditions)].to(text_emb.device)))
        return torch.cat(features, -1)

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention keys and values for a memory (cache them across sampling steps)."""
        return [block.cross.kv_of(memory) for block in self.blocks]

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """tokens [B, N] (mask id where masked) -> logits [B, N, codebook_size]."""
        x = self._inputs(tokens, memory)
        h = self._blocks(self._merged(x), memory, memory_mask, kv)
        if self.spec.patch > 1:  # each token reads its block's output and, skipping the blocks, its own input
            h = self._unmerged(self.split(h)) + x
        return self.head(self.norm(h))

    def hidden(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
               kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None, blocks: int | None = None) -> torch.Tensor:
        """Hidden states [B, block_side^2, dim] after the first `blocks` blocks (all of them when None)."""
        return self._blocks(self._merged(self._inputs(tokens, memory)), memory, memory_mask, kv, blocks)

    def _inputs(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.spec.cond_aligned and self.spec.cond_codebook_size:
            x = x + self._aligned_cond(memory)
        return x

    def _blocks(self, x, memory, memory_mask, kv, blocks: int | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks[:blocks]):
            x = block(x, memory, memory_mask, None if kv is None else kv[i])
        return x

    def _merged(self, x: torch.Tensor) -> torch.Tensor:
        """[B, side^2, d] -> [B, block_side^2, d]: each patch x patch block's embeddings, concatenated, projected."""
        p, s = self.spec.patch, self.spec.side
        if p == 1:
            return x
        grid = F.pixel_unshuffle(x.transpose(1, 2).reshape(x.shape[0], -1, s, s), p)  # [B, d p^2, s/p, s/p]
        return self.merge(grid.flatten(2).transpose(1, 2))

    def _unmerged(self, h: torch.Tensor) -> torch.Tensor:
        """[B, block_side^2, d p^2] -> [B, side^2, d]: the inverse layout of `_merged`."""
        p, bs = self.spec.patch, self.spec.block_side
        grid = F.pixel_shuffle(h.transpose(1, 2).reshape(h.shape[0], -1, bs, bs), p)
        return grid.flatten(2).transpose(1, 2)

    def _aligned_cond(self, memory: torch.Tensor) -> torch.Tensor:
        """The encoded low-res grid (memory positions 1..n) projected and upsampled to the token grid."""
        cs, s = self.spec.cond_side, self.spec.side
        c = memory[:, 1:1 + cs * cs]
        if self.spec.cond_upsample == "subpixel":
            grid = c.transpose(1, 2).reshape(c.shape[0], -1, cs, cs)
            return F.pixel_shuffle(self.cond_to_input(grid), s // cs).flatten(2).transpose(1, 2)
        c = self.cond_to_input(c)
        grid = c.transpose(1, 2).reshape(c.shape[0], -1, cs, cs)
        return F.interpolate(grid, scale_factor=s // cs, mode="nearest").flatten(2).transpose(1, 2)

    def flops_per_token(self, memory_len: int) -> float:
        """Training FLOPs per image token (6 x matmul params + attention), for throughput and MFU figures."""
        d, n, p2 = self.spec.dim, self.spec.block_side ** 2, self.spec.patch ** 2
        per_block = 4 * d * d + 2 * d * d + 2 * d * d + 2 * self.spec.mlp_ratio * d * d  # self, cross q/out, kv, mlp
        attn = 2 * n * d + 2 * memory_len * d
        merge = 0 if p2 == 1 else 2 * d * d  # merge and split, per token
        return 6 * self.spec.depth * (per_block + attn) / p2 + 6 * merge + 6 * d * self.spec.codebook_size


def save_transformer(model: MaskedTransformer, directory, extra: dict | None = None) -> None:
    """`model.safetensors` + `config.json` (the spec and anything in `extra`)."""
    from dataclasses import asdict

    save_weights(model, directory, {"spec": asdict(model.spec), **(extra or {})})


def load_transformer(directory) -> tuple[MaskedTransformer, dict]:
    """(model in eval mode, the saved config) from a directory written by `save_transformer`."""
    state, config = read_weights(directory)
    model = MaskedTransformer(TransformerSpec(**config["spec"]))
    model.load_state_dict(fuse_self_attention(state))
    return model.eval(), config


def fuse_self_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved before self-attention fused its projections (`attn.q` + `attn.kv`) -> `attn.qkv`."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".attn.q.weight")]:
        prefix = key[: -len("q.weight")]
        out[prefix + "qkv.weight"] = torch.cat([out.pop(key), out.pop(prefix + "kv.weight")], 0)
    return out
