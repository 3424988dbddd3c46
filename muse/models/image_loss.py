"""The loss of every model that draws pixels (the image tokenizers, the finetuned decoder).

Reconstruction: L1 + L2 + LPIPS (when VGG weights are configured). Adversarial, from
`disc_start`: a PatchGAN discriminator with the hinge loss, the generator's term weighted by
taming's adaptive weight (the ratio of the two losses' gradient norms at the last layer).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from muse.config import VQLossConfig
from muse.models.vqgan import PatchDiscriminator, adaptive_weight, hinge_d_loss

log = logging.getLogger("muse.models.image_loss")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1]."""
    mse = ((x - y) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean()


def perceptual_loss(loss: VQLossConfig, device) -> nn.Module | None:
    """LPIPS on the configured VGG weights, or None (said in the log) when there are none."""
    if loss.vgg_weights and loss.perceptual_weight:
        from muse.models.perceptual import load_lpips

        return load_lpips(loss.vgg_weights).to(device)
    log.info("no VGG weights (loss.vgg_weights): training without LPIPS")
    return None


def lpips_status(loss: VQLossConfig) -> str:
    """Whether LPIPS trained this model, for its manifest: a reader of the figures must know."""
    if not loss.perceptual_weight:
        return "off: perceptual_weight is 0"
    return f"on: VGG weights {loss.vgg_weights}" if loss.vgg_weights else "off: no loss.vgg_weights (LPIPS weights path)"


class ImageLoss:
    """Reconstruction and GAN terms for an objective whose generator module ends in `last_layer`."""

    def __init__(self, loss: VQLossConfig, perceptual: nn.Module | None):
        self.loss, self.perceptual = loss, perceptual
        self.disc = PatchDiscriminator(3, loss.disc_ch, loss.disc_layers) if loss.disc_weight > 0 else None

    def register(self, modules: dict[str, nn.Module], optimizers: dict[str, list[str]]) -> None:
        """Add the discriminator and its optimizer to an objective's (nothing without a GAN)."""
        if self.disc is not None:
            modules["disc"] = self.disc
            optimizers["disc"] = ["disc"]

    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        rec = self.loss.l1_weight * (x - recon).abs().mean()
        if self.loss.l2_weight:
            rec = rec + self.loss.l2_weight * (x - recon).pow(2).mean()
        if self.perceptual is not None and self.loss.perceptual_weight:
            rec = rec + self.loss.perceptual_weight * self.perceptual(recon, x).mean()
        return rec

    def adversarial(self, x: torch.Tensor, recon: torch.Tensor, rec: torch.Tensor, last_layer: torch.Tensor,
                    step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the generator's weighted GAN term, figures with the discriminator's loss `disc`); zero before
        `disc_start` or without a discriminator."""
        if self.disc is None or step < self.loss.disc_start:
            return torch.zeros((), device=x.device), {}
        g_loss = -self.disc(recon).mean()
        weight = self.loss.disc_weight * adaptive_weight(rec, g_loss, last_layer)
        figures = {"disc": hinge_d_loss(self.disc(x.detach()), self.disc(recon.detach())),
                   "g_loss": g_loss.detach(), "d_weight": weight}
        return weight * g_loss, figures
