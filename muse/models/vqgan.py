"""VQGAN: a convolutional encoder, a vector-quantized bottleneck, a convolutional decoder.

Taming-transformers' layout: per level `num_res_blocks` ResBlocks (GroupNorm + SiLU),
self-attention at the listed feature-map sides, a stride-2 downsampling between
levels; a ResBlock-attention-ResBlock middle; the decoder mirrors it with nearest
upsampling (`arch: vqvae` swaps in the plainer layout of `muse.models.vqvae`).
The quantizer is `vector-quantize-pytorch`'s: a codebook (latents projected to
low-dimensional, optionally l2-normalised codes, EMA-updated, with dead-code
restarts) or, with `quantizer: fsq`, finite scalar quantization (a few rounded
dimensions whose level combinations are the codes). Images are in [-1, 1]; token
ids are the code indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from muse.config import VQModelConfig
from muse.models.saved import read_weights, save_weights
from muse.models.vqvae import PlainResBlock, VQVAEDecoder, VQVAEEncoder


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) if channels >= 8 else 1, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GN-SiLU-conv twice, plus the input (projected when the width changes)."""

    checkpoint_unit = True  # recomputed in backward under train.activation_checkpointing

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(
            norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    checkpoint_unit = True  # recomputed in backward under train.activation_checkpointing

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def _level(cin: int, cout: int, blocks: int, attn: bool) -> tuple[list[nn.Module], int]:
    if blocks == 0:  # no ResBlock to change the width: a 1x1 conv does
        return ([] if cin == cout else [nn.Conv2d(cin, cout, 1)]), cout
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers.append(ResBlock(cin, cout))
        cin = cout
        if attn:
            layers.append(AttnBlock(cout))
    return layers, cout


class Encoder(nn.Module):
    def __init__(self, cfg: VQModelConfig, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, cfg.ch, 3, padding=1)]
        cin, side = cfg.ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            level, cin = _level(cin, cfg.ch * mult, cfg.num_res_blocks, side in cfg.attn_resolutions)
            layers += level
            if i < len(cfg.ch_mult) - 1:
                layers.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                side //= 2
        if cfg.mid_block:
            layers += [ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin)]
        layers += [norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.embed_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of the encoder; `extra_res_blocks` and `width_mult` build the larger finetuned decoder."""

    def __init__(self, cfg: VQModelConfig, out_channels: int, extra_res_blocks: int = 0, width_mult: float = 1.0):
        super().__init__()
        ch = int(round(cfg.ch * width_mult / 8)) * 8
        cin = ch * cfg.ch_mult[-1]
        side = cfg.token_side
        layers: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, cin, 3, padding=1)]
        if cfg.mid_block:
            layers += [ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin)]
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            level, cin = _level(cin, ch * mult, cfg.num_res_blocks + 1 + extra_res_blocks,
                                side in cfg.attn_resolutions)
            layers += level
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)]
                side *= 2
        layers += [norm(cin), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.net(z))


def make_encoder(cfg: VQModelConfig, in_channels: int) -> nn.Module:
    return VQVAEEncoder(cfg, in_channels) if cfg.arch == "vqvae" else Encoder(cfg, in_channels)


def make_decoder(cfg: VQModelConfig, out_channels: int, extra_res_blocks: int = 0, width_mult: float = 1.0) -> nn.Module:
    """The decoder of `cfg.arch`; every one has `.net` (layers in order) and `.conv_out` (the last layer)."""
    kind = VQVAEDecoder if cfg.arch == "vqvae" else Decoder
    return kind(cfg, out_channels, extra_res_blocks, width_mult)


class VQModel(nn.Module):
    """Encoder -> quant conv -> codebook -> post-quant conv -> decoder."""

    def __init__(self, cfg: VQModelConfig, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg, in_channels)
        self.quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)
        if cfg.quantizer == "fsq":
            self.quantizer = FSQ(list(cfg.fsq_levels), dim=cfg.embed_dim, channel_first=True)
        else:
            self.quantizer = VectorQuantize(
                dim=cfg.embed_dim, codebook_size=cfg.codebook_size, codebook_dim=cfg.code_dim,
                use_cosine_sim=cfg.use_cosine_sim, ema_update=cfg.ema_update, learnable_codebook=not cfg.ema_update,
                decay=cfg.decay, threshold_ema_dead_code=cfg.threshold_ema_dead_code, kmeans_init=cfg.kmeans_init,
                rotation_trick=cfg.rotation_trick, commitment_weight=cfg.commitment_weight, accept_image_fmap=True,
            )
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)
        self.decoder = make_decoder(cfg, out_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images [B, C, H, W] -> (quantized latents, token ids [B, h, w], codebook + commitment loss)."""
        z = self.quant_conv(self.encoder(x))
        if self.cfg.quantizer == "fsq":  # rounding has no codebook to pull latents towards: no loss term
            quantized, codes = self.quantizer(z)
            return quantized, codes.long(), z.new_zeros(())
        return self.quantizer(z)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> the quantized latents the encoder would have produced for them."""
        if self.cfg.quantizer == "fsq":
            return self.quantizer.indices_to_codes(codes)
        return self.quantizer.project_out(self.quantizer.codebook[codes]).permute(0, 3, 1, 2)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.codes_to_latents(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, codes, vq_loss = self.encode(x)
        return self.decode(quantized), codes, vq_loss

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs with BatchNorm and LeakyReLU; one logit per patch."""

    def __init__(self, in_channels: int = 3, ch: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        cin = ch
        for i in range(1, layers + 1):
            cout = ch * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            cin = cout
        mods.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above 1 and fake below -1."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4) at the decoder's last layer (taming's balance)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, max_weight).detach()


# ----------------------------------------------------------------------------- saving and loading

def save_pretrained(model: VQModel, directory, in_channels: int, out_channels: int, extra: dict | None = None) -> None:
    """`model.safetensors` + `config.json` (geometry, channels, anything in `extra`) into a directory."""
    save_weights(model, directory, {"model": model.cfg.model_dump(mode="json"), "in_channels": in_channels,
                                    "out_channels": out_channels, **(extra or {})})


def from_pretrained(directory) -> VQModel:
    """A VQModel in eval mode from a directory written by `save_pretrained` (e.g. a vqgan-* artifact)."""
    state, config = read_weights(directory)
    model = VQModel(VQModelConfig.model_validate(config["model"]), config["in_channels"], config["out_channels"])
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------- decoder finetuning


class LatentDecoder(nn.Module):
    """Post-quant conv + decoder: quantized latents -> images. Decoder finetuning trains a larger one of these
    against a frozen encoder and codebook, so every image keeps its token ids."""

    def __init__(self, cfg: VQModelConfig, out_channels: int = 3, extra_res_blocks: int = 0, width_mult: float = 1.0):
        super().__init__()
        self.cfg, self.out_channels = cfg, out_channels
        self.extra_res_blocks, self.width_mult = extra_res_blocks, width_mult
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)
        self.decoder = make_decoder(cfg, out_channels, extra_res_blocks, width_mult)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


def _copy_corner(target: torch.Tensor, value: torch.Tensor, transposed: bool = False) -> None:
    """Copy the overlapping corner; for conv/linear weights, zero what new input channels feed old outputs
    so the old channels compute what they computed before (a transposed conv keeps inputs in dim 0)."""
    corner = tuple(slice(0, min(a, b)) for a, b in zip(target.shape, value.shape))
    target[corner] = value[corner]
    if target.dim() < 2:
        return
    if transposed and target.shape[0] > value.shape[0]:
        target[value.shape[0]:, : value.shape[1]] = 0
    elif not transposed and target.shape[1] > value.shape[1]:
        target[: value.shape[0], value.shape[1]:] = 0


RESIDUAL = (ResBlock, PlainResBlock)


@torch.no_grad()
def init_from(new: LatentDecoder, old: VQModel) -> int:
    """Start the larger decoder from a trained one: the post-quant conv, then the decoder's layers matched in
    order (an old layer to the next new layer of the same type; the extra ResBlocks sit at the end of each
    level and are skipped) with weights copied where shapes allow. Extra ResBlocks start as the identity
    (their last conv zeroed). Returns how many layers were initialised."""
    new.post_quant_conv.load_state_dict(old.post_quant_conv.state_dict())
    new_layers = list(new.decoder.net) + [new.decoder.conv_out]
    old_layers = list(old.decoder.net) + [old.decoder.conv_out]
    matched, j = 0, 0
    for i, layer in enumerate(old_layers):
        while j < len(new_layers) and type(new_layers[j]) is not type(layer):
            _identity_start(new_layers[j])
            j += 1
        if j == len(new_layers):
            break
        target = dict(new_layers[j].named_parameters())
        transposed = isinstance(layer, nn.ConvTranspose2d)
        for name, value in layer.named_parameters():
            if name in target and target[name].dim() == value.dim():
                _copy_corner(target[name].data, value.data, transposed)
        matched += 1
        j += 1
        # The old level's last ResBlock: the new ResBlocks that follow it are the extra ones.
        level_ends = isinstance(layer, RESIDUAL) and not (i + 1 < len(old_layers)
                                                          and isinstance(old_layers[i + 1], RESIDUAL))
        while level_ends and j < len(new_layers) and isinstance(new_layers[j], RESIDUAL):
            _identity_start(new_layers[j])
            j += 1
    return matched


def _identity_start(layer: nn.Module) -> None:
    """A ResBlock whose residual branch outputs zero: it passes its input through until it learns."""
    if isinstance(layer, PlainResBlock) or (isinstance(layer, ResBlock) and isinstance(layer.skip, nn.Identity)):
        nn.init.zeros_(layer.block[-1].weight)
        nn.init.zeros_(layer.block[-1].bias)


def save_decoder(decoder: LatentDecoder, directory, extra: dict | None = None) -> None:
    save_weights(decoder, directory, {"model": decoder.cfg.model_dump(mode="json"), "out_channels": decoder.out_channels,
                                      "extra_res_blocks": decoder.extra_res_blocks, "width_mult": decoder.width_mult,
                                      **(extra or {})})


def load_decoder(directory) -> LatentDecoder:
    """A LatentDecoder in eval mode from a `decoder` artifact."""
    state, c = read_weights(directory)
    decoder = LatentDecoder(VQModelConfig.model_validate(c["model"]), c["out_channels"], c["extra_res_blocks"],
                            c["width_mult"])
    decoder.load_state_dict(state)
    return decoder.eval()
