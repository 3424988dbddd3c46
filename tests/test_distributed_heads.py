"""Ray Train data parallelism of the CLIP, the prior and the guide head.

The CLIP's loss contrasts the whole batch, so its workers all-gather their features (with
gradients) and every rank scores the union batch: two gloo workers must then train like one on
the union batch, and without the gather they must not. The prior's loss is a per-row mean, so
averaged gradients alone make two workers equal one.
"""

from __future__ import annotations

import sys

import pytest
import ray
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from muse.config import ClipArchConfig, RayConfig, TrainConfig, WorkersConfig
from muse.distributed import fit, rank_world
from muse.models.clip import Clip
from muse.models.prior import Prior, PriorSpec
from muse.stage import execute
from muse.stages.train_clip import ClipObjective
from muse.training import TrainLoop, seeded

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import tests/

CLIP = ClipArchConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=16, vision_layers=1,
                      vision_head_width=8, context_length=8, text_width=16, text_heads=2, text_layers=1)
BATCH = 8
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow diamond",
            "a purple circle on the left", "an orange square at the top", "a red triangle", "a blue diamond"]


class PriorObjectiveOnRows:
    """The prior's objective on fixed (text, image) embedding rows: 1 - cosine, as train-prior trains it."""

    def __init__(self, prior: Prior):
        self.prior, self.modules, self.optimizers, self.ema = prior, {"prior": prior}, {"loss": ["prior"]}, []

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        return {"loss": (1 - F.cosine_similarity(self.prior(batch["text"]), batch["image"], dim=-1)).mean()}


def _train_one(model_name: str, share: str, work: str) -> None:
    """A few loop steps on this rank's share of a fixed batch ("rank": split over the workers; "half": one process
    on the first half); "clip-local" contrasts each worker's own rows only (the negative control)."""
    rank, world = rank_world()
    g = torch.Generator().manual_seed(5)
    if model_name.startswith("clip"):
        with seeded(0):
            model = Clip(CLIP)
        objective = ClipObjective(model)
        if model_name == "clip-local":
            from open_clip.loss import ClipLoss

            objective.loss = ClipLoss()
        batch = {"image": torch.rand(BATCH, 3, 16, 16, generator=g) * 2 - 1, "tokens": model.tokens(CAPTIONS)}
    else:
        with seeded(0):
            model = Prior(PriorSpec(text_dim=12, image_dim=6, dim=16, depth=1))
        objective = PriorObjectiveOnRows(model)
        batch = {"text": torch.randn(BATCH, 12, generator=g), "image": F.normalize(torch.randn(BATCH, 6, generator=g))}
    batch = {k: v[rank::world] if share == "rank" else v[:BATCH // 2] for k, v in batch.items()}
    cfg = TrainConfig(steps=3, batch_size=BATCH // world, lr=1e-2, warmup_steps=1, ema_decay=0.0,
                      checkpoint_every=1000, log_every=1000)
    loop = TrainLoop(cfg, objective, f"{work}/{model_name}", model_name, "cpu", rank=rank)

    def data(position):
        while True:
            yield batch

    loop.run(data)
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, f"{work}/{model_name}.safetensors")


def _train(job: dict) -> dict:
    for model_name in job["models"]:
        _train_one(model_name, job["share"], job["dir"])
    return {"world": rank_world()[1]}


def _run(tmp_path, name: str, workers: int, models: tuple[str, ...], share: str = "rank") -> dict[str, dict]:
    """Train `models` on `workers` workers (one Ray Train run for all of them); rank 0's weights of each."""
    work = tmp_path / name
    work.mkdir()
    job = {"dir": str(work), "models": models, "share": share}
    assert fit(_train, job, WorkersConfig(num_workers=workers), RayConfig(), work)["world"] == workers
    return {m: load_file(str(work / f"{m}.safetensors")) for m in models}


def _close(a: dict, b: dict) -> bool:
    # Attention's key bias has a zero gradient (softmax ignores a shift shared by all keys): Adam scales its
    # rounding noise up to full steps, so it is left out.
    keys = [k for k in a if not k.endswith("attn.in_proj_bias")]
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4) for k in keys)


def test_two_workers_train_the_clip_and_the_prior_like_one_worker_on_the_union_batch(ray_local, tmp_path):
    one = _run(tmp_path, "one", 1, ("clip", "prior"))
    two = _run(tmp_path, "two", 2, ("clip", "clip-local", "prior"))
    assert _close(one["clip"], two["clip"])
    assert _close(one["prior"], two["prior"])
    # negative controls: each CLIP worker contrasting its own half only is another loss, and another model;
    # one prior worker on half the batch (nothing averaged) is another model too
    assert not _close(one["clip"], two["clip-local"])
    assert not _close(one["prior"], _run(tmp_path, "half", 1, ("prior",), share="half")["prior"])


@pytest.mark.slow  # three Ray Train runs on the session's store: about two minutes
def test_train_clip_prior_and_guide_stages_on_two_ray_train_workers(trained_store, tmp_path):
    from muse.artifacts.store import ArtifactStore
    from muse.config import load_config
    from muse.stages import tokenize, train_clip, train_guide, train_prior
    from tests.conftest import SMALL
    from tests.test_clip import CLIP_SMALL

    _, store, arts = trained_store
    two = ["workers={num_workers: 2}"]
    cfg = load_config("tiny", overrides=[*SMALL, *CLIP_SMALL, "tokenize.row_group_size=4", "tokenize.batch_size=3",
                                         "train_clip.enabled=true", "train_prior.enabled=true",
                                         *(f"{s}.{w}" for s in ("train_clip", "train_prior", "train_guide") for w in two),
                                         "train_prior.train={steps: 4, batch_size: 8, checkpoint_every: 2}",
                                         "train_guide.train={steps: 4, batch_size: 8, checkpoint_every: 2}"])
    own = ArtifactStore(tmp_path / "store")
    clip = execute(train_clip, cfg, {"shards": arts["shards"]}, own)
    assert clip.manifest.metrics["workers"] == 2 and clip.manifest.metrics["steps"] == cfg.train_clip.train.steps
    tokens = execute(tokenize, cfg, {**arts, "clip": clip}, own)
    prior = execute(train_prior, cfg, {"tokens": tokens, "clip": clip}, own)
    assert prior.manifest.metrics["workers"] == 2 and prior.manifest.metrics["steps"] == 4
    guide = execute(train_guide, cfg, {"shards": arts["shards"], "tokens": arts["tokens"], "base": arts["base"]}, store)
    assert guide.manifest.metrics["workers"] == 2 and guide.manifest.metrics["steps"] == 4
    assert guide.version != arts["guide"].version  # two workers split the rows another way: another version
