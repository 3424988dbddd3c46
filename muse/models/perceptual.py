"""LPIPS perceptual distance with its VGG16 backbone loaded from a local torchvision checkpoint.

The `lpips` package ships its learned linear heads; the backbone it would download
from torchvision's hub instead comes from a path (`train_vqgan.loss.vgg_weights`),
so training never reaches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# torchvision vgg16().features index ranges of lpips's five slices.
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def load_lpips(vgg_weights: str | Path) -> nn.Module:
    """LPIPS(vgg) in eval mode, frozen, expecting images in [-1, 1]."""
    import lpips

    path = Path(vgg_weights)
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights for LPIPS not found: {path} (train_vqgan.loss.vgg_weights)")
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"{path}: no 'features.*' tensors: not a torchvision VGG16 checkpoint")
    mapped = {}
    for n, (lo, hi) in enumerate(_SLICES, start=1):
        for k, v in features.items():
            index = int(k.split(".")[0])
            if lo <= index < hi:
                mapped[f"slice{n}.{k}"] = v
    model.net.load_state_dict(mapped, strict=True)
    return model.eval().requires_grad_(False)
