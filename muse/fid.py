"""Frechet Inception distance on the standard FID network, with the real images' statistics cached.

The network is torch-fidelity's port of the TensorFlow FID Inception (pt_inception-2015-12-05,
the one of TF FID, pytorch-fid, torchmetrics and clean-fid's legacy mode): uint8 images at
any size, resized TF-style (bilinear) to 299 inside the network, 2048-d pool features. Its
weights come from a path (`evaluate.inception_weights`), never from the network at run time.
Features are computed in batches on the stage's device; the distance in float64.

The real images' mean and covariance depend only on which images they are and on the
network, so they are cached under the store's `.cache/fid/`, keyed by the dataset version,
split, count, resolution and the weights file's digest: a second evaluation of the same data
reads them back instead of running Inception over the real images again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

FEATURES = "2048"  # torch-fidelity's name for the pool3 features FID is defined on


def weights_digest(path: str | Path) -> str:
    """First 12 hex of the weights file's sha256: two files of the same network share their cached statistics."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


class InceptionFeatures:
    """Pool features of the FID Inception network for lists of PIL images, in batches on `device`."""

    def __init__(self, weights: str | Path, device: torch.device, batch_size: int = 32):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if not Path(weights).is_file():
            raise FileNotFoundError(f"evaluate.inception_weights: {weights}: no such file")
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURES], str(weights)).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
                             for im in images[i:i + self.batch_size]])
            (features,) = self.net(x.to(self.device))
            out.append(features.double().cpu().numpy())
        return np.concatenate(out)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of [N, D] features."""
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), the trace of the root as the sum of the roots of
    S1 S2's eigenvalues (real and >= 0 for covariances, up to rounding): no matrix square root, which is slow
    at 2048 dimensions, and exact also when few samples make S1 S2 singular."""
    s1, s2 = torch.from_numpy(sigma1).double(), torch.from_numpy(sigma2).double()
    root_trace = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * root_trace)


def reference_statistics(cache_dir: Path, key: str,
                         images: Callable[[], list[Image.Image]],
                         features: InceptionFeatures) -> tuple[np.ndarray, np.ndarray, bool]:
    """(mean, covariance, cached) of the real images `key` names: read from `cache_dir`, or computed from
    `images()` and written there (atomically: a crash leaves no half file)."""
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        saved = np.load(path)
        return saved["mu"], saved["sigma"], True
    mu, sigma = statistics(features(images()))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, mu=mu, sigma=sigma)
    partial.replace(path)
    return mu, sigma, False
