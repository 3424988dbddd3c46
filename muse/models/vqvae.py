"""VQ-VAE layout (van den Oord et al. 2017): strided 4x4 convs down, a residual stack at the token
resolution, transposed 4x4 convs up; no normalisation.

The alternative to taming's layout (`arch: vqvae`) for small tokenizers on CPU: taming runs
3x3 convs and GroupNorm at full resolution, which dominates the step time of a narrow
model; here the first layer already halves the side and the last one doubles it. Without
GroupNorm (which normalises each group over space) a flat image with one small shape
keeps its colour intensities, which the demo's colour checks need.
"""

from __future__ import annotations

import torch
from torch import nn

from muse.config import VQModelConfig


class PlainResBlock(nn.Module):
    """SiLU-3x3 conv-SiLU-1x1 conv, plus the input (VQ-VAE's residual unit)."""

    checkpoint_unit = True  # recomputed in backward under train.activation_checkpointing

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                   nn.SiLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _widths(cfg: VQModelConfig, ch: int) -> list[int]:
    return [ch * m for m in cfg.ch_mult]


class VQVAEEncoder(nn.Module):
    """One stride-2 conv per level after the first, then `num_res_blocks` residual units and a 1x1 conv to
    the latent."""

    def __init__(self, cfg: VQModelConfig, in_channels: int):
        super().__init__()
        widths = _widths(cfg, cfg.ch)
        layers: list[nn.Module] = []
        cin = in_channels
        for width in widths[1:]:
            layers += [nn.Conv2d(cin, width, 4, stride=2, padding=1), nn.SiLU()]
            cin = width
        layers.append(nn.Conv2d(cin, cin, 3, padding=1))
        layers += [PlainResBlock(cin) for _ in range(cfg.num_res_blocks)]
        layers += [nn.SiLU(), nn.Conv2d(cin, cfg.embed_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VQVAEDecoder(nn.Module):
    """Mirror of the encoder. `extra_res_blocks` and `width_mult` build the larger finetuned decoder; the last
    transposed conv is `conv_out` (the adaptive GAN weight's reference layer)."""

    def __init__(self, cfg: VQModelConfig, out_channels: int, extra_res_blocks: int = 0, width_mult: float = 1.0):
        super().__init__()
        widths = _widths(cfg, int(round(cfg.ch * width_mult / 8)) * 8)
        cin = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, cin, 3, padding=1)]
        layers += [PlainResBlock(cin) for _ in range(cfg.num_res_blocks + extra_res_blocks)]
        layers.append(nn.SiLU())
        for width in reversed(widths[1:-1]):
            layers += [nn.ConvTranspose2d(cin, width, 4, stride=2, padding=1), nn.SiLU()]
            cin = width
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.ConvTranspose2d(cin, out_channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.net(z))
