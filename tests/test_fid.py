"""FID on the FID Inception network: distances, batching, and the cached reference statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from muse.fid import InceptionFeatures, frechet_distance, reference_statistics, statistics


def _shapes(n: int, seed: int) -> list[Image.Image]:
    """Demo-like images: a coloured disc on grey, at random places."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[:64, :64]
        cy, cx, r = rng.integers(16, 48, 2).tolist() + [int(rng.integers(6, 14))]
        img = np.full((64, 64, 3), 128, np.uint8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        out.append(Image.fromarray(img))
    return out


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(inception_weights):
    features = InceptionFeatures(inception_weights, torch.device("cpu"), batch_size=5)
    real, other = _shapes(24, 0), _shapes(24, 1)
    noise = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(24)]
    f_real = features(real)
    assert f_real.shape == (24, 2048)
    same = frechet_distance(*statistics(f_real), *statistics(f_real))
    like = frechet_distance(*statistics(features(other)), *statistics(f_real))
    far = frechet_distance(*statistics(features(noise)), *statistics(f_real))
    assert abs(same) < 1e-6 * far and like < far / 3
    # batching does not change the features
    assert np.allclose(InceptionFeatures(inception_weights, torch.device("cpu"), batch_size=24)(real), f_real,
                       atol=1e-4)


def test_reference_statistics_are_computed_once_per_key(inception_weights, tmp_path):
    features = InceptionFeatures(inception_weights, torch.device("cpu"))
    calls = []

    def images():
        calls.append(1)
        return _shapes(8, 0)

    mu, sigma, cached = reference_statistics(tmp_path, "shards-abc-val-all-64px", images, features)
    assert not cached and len(calls) == 1
    mu2, sigma2, cached = reference_statistics(tmp_path, "shards-abc-val-all-64px", images, features)
    assert cached and len(calls) == 1 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    reference_statistics(tmp_path, "shards-abc-val-all-32px", images, features)  # another key: computed
    assert len(calls) == 2 and not list(tmp_path.glob("*.partial*"))


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights: .*nope.pth: no such file"):
        InceptionFeatures(tmp_path / "nope.pth", torch.device("cpu"))


def test_the_distance_matches_its_closed_form_from_the_features():
    """Tr((S1 S2)^1/2) from eigenvalues equals the nuclear norm of A B^T / sqrt((n-1)(m-1)) (A, B: centred
    features), an independent way to the same number."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 64)), rng.normal(0.5, 2.0, size=(20, 64))
    ca, cb = a - a.mean(0), b - b.mean(0)
    nuclear = np.linalg.svd(ca @ cb.T / np.sqrt(29 * 19), compute_uv=False).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False)) + \
        np.trace(np.cov(b, rowvar=False)) - 2 * nuclear
    assert frechet_distance(*statistics(a), *statistics(b)) == pytest.approx(expected, rel=1e-6)
