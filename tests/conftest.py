"""Shared fixtures: one Prefect test server per session, small configs, temporary stores."""

from __future__ import annotations

import pytest

from muse.artifacts.store import ArtifactStore
from muse.config import load_config
from muse.stage import execute

# Small geometry so tests run in seconds: 32 px shards, 8 demo images per test unless asked otherwise.
SMALL = [
    "train_vqgan.low.resolution=32",
    "train_vqgan.low.ch=16",
    "train_vqgan.low.ch_mult=[1, 2, 4, 4]",  # f8: the low-res grid as small as the high-res one (4x4)
    "train_vqgan.high.resolution=32",
    "demo.num_samples=24",
    "demo.image_size=48",
    "shard.workers=1",
    "shard.samples_per_shard=10",
    "shard.val_fraction=0.25",
    "train_vqgan.seg.resolution=32",
    "train_vqgan.train.steps=4",
    "train_vqgan.train.batch_size=4",
    "train_vqgan.overrides={}",
    "train_base.train.steps=4",
    "train_base.train.batch_size=4",
    "train_base.model={dim: 32, depth: 1, heads: 2}",
    "train_superres.train.steps=4",
    "train_superres.train.batch_size=4",
    "train_superres.model={dim: 32, depth: 1, heads: 2, cond_depth: 1}",
    "train_guide.train.steps=4",
    "train_guide.train.batch_size=4",
    "finetune_decoder.train.steps=4",
    "finetune_decoder.train.batch_size=4",
    "evaluate.num_prompts=4",
    "sampling.base.steps=4",
    "sampling.superres.steps=2",
]


@pytest.fixture(scope="session")
def prefect_api():
    """A real (temporary) Prefect API server shared by every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def small_config():
    def make(*overrides: str):
        return load_config("tiny", overrides=[*SMALL, *overrides])

    return make


@pytest.fixture(scope="session")
def pipeline_store(tmp_path_factory, ray_local):
    """One store with shards, segments, the three tokenizers (a few steps) and tokens, built once per session.

    Tests that need upstream artifacts read from it; a test that writes must use its own store.
    """
    from muse.stages import segment, shard, tokenize, train_vqgan

    cfg = load_config("tiny", overrides=[*SMALL, "tokenize.row_group_size=4", "tokenize.batch_size=3"])
    store = ArtifactStore(tmp_path_factory.mktemp("pipeline") / "store")
    arts = {"shards": execute(shard, cfg, {}, store)}
    arts["segments"] = execute(segment, cfg, arts, store)
    arts.update({a.kind: a for a in execute(train_vqgan, cfg, arts, store)})
    arts["tokens"] = execute(tokenize, cfg, arts, store)
    return cfg, store, arts


@pytest.fixture(scope="session")
def trained_store(pipeline_store):
    """pipeline_store plus base, guide, superres, decoder and report (a few steps each), built once per session."""
    from muse.stages import (
        evaluate,
        finetune_decoder,
        train_base,
        train_guide,
        train_superres,
    )

    cfg, store, arts = pipeline_store
    arts = dict(arts)
    arts["base"] = execute(train_base, cfg, arts, store)
    arts["guide"] = execute(train_guide, cfg, arts, store)
    arts["superres"] = execute(train_superres, cfg, arts, store)
    arts["decoder"] = execute(finetune_decoder, cfg, arts, store)
    arts["report"] = execute(evaluate, cfg, arts, store)
    return cfg, store, arts


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A weights file of the FID Inception network, randomly initialised (the real one cannot be downloaded
    here): the distances it gives mean nothing, but a set is still at 0 from itself and far from noise."""
    from unittest import mock

    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as fx

    with mock.patch.object(fx, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        torch.manual_seed(0)
        net = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # He init keeps the activations' scale through ~90 conv layers (the default shrinks it)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path
