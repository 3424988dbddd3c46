"""Resuming on another worker count: with `train.data_streams` set, every step reads the same samples on
any count that divides the streams, the version keeps the global batch, and a checkpoint written by two
workers continues on one exactly as a one-worker run would have."""

from __future__ import annotations

import sys

import pytest
import ray
import torch
import webdataset as wds
from torch import nn

from muse.config import ConfigError, RayConfig, TrainConfig, WorkersConfig, load_config
from muse.datasets.stream import sample_stream
from muse.distributed import fit, rank_world
from muse.errors import UserError
from muse.stage import output_versions
from muse.stages import finetune_decoder, train_base, train_vqgan
from muse.training import TrainLoop, seeded

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import tests/

GLOBAL_BATCH, STEPS = 8, 6


def _tars(root) -> list:
    """8 tars of 6 samples; a sample's value is its index."""
    root.mkdir()
    for t in range(8):
        with wds.TarWriter(str(root / f"{t:06d}.tar")) as w:
            for i in range(t * 6, t * 6 + 6):
                w.write({"__key__": f"{i:06d}", "txt": str(i).encode()})
    return sorted(root.glob("*.tar"))


def _step_keys(files, streams, world, step) -> set[str]:
    """The union over the ranks of the keys one global step reads."""
    per_rank = GLOBAL_BATCH // world
    keys = set()
    for rank in range(world):
        stream = sample_stream(files, 7, step * per_rank, 5, rank, world, streams)
        keys |= {next(stream)[0] for _ in range(per_rank)}
    return keys


def test_a_step_reads_the_same_samples_on_any_worker_count_that_divides_the_streams(tmp_path):
    files = _tars(tmp_path / "tars")
    for step in (0, 3, 7):  # 7: past the first epoch of 48 samples
        one, two, four = (_step_keys(files, 4, world, step) for world in (1, 2, 4))
        assert len(one) == GLOBAL_BATCH and one == two == four
    epoch = set().union(*(_step_keys(files, 4, 2, step) for step in range(6)))
    assert len(epoch) == 48  # every sample once per epoch
    # negative control: one stream per worker (the default) cuts each step differently per count
    assert _step_keys(files, 1, 1, 0) != _step_keys(files, 2, 2, 0)
    with pytest.raises(ValueError, match="4 data streams cannot be split evenly over 3 workers"):
        sample_stream(files, 7, 0, 5, 0, 3, 4)


class _Regression:
    """Least squares on the samples' values: deterministic, and its union-batch gradient is the mean of the
    workers' (equal batches), so the math allows an exact resume on another count."""

    def __init__(self):
        with seeded(0):
            self.model = nn.Linear(3, 1)
        self.modules, self.optimizers, self.ema = {"model": self.model}, {"loss": ["model"]}, []

    def losses(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        x = torch.stack([batch / 48, (batch / 48) ** 2, torch.ones_like(batch)], 1)
        loss = ((self.model(x)[:, 0] - torch.sin(batch / 8)) ** 2).mean()
        return {"loss": loss}


def _run(job: dict) -> dict:
    """`job["max_steps"]` loop steps on this worker's share (or to the end), in `job["work"]`."""
    _, world = rank_world()
    cfg = TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH // world, lr=0.05, warmup_steps=0, schedule="constant",
                      checkpoint_every=3, log_every=100, shuffle_buffer=5, data_streams=job["streams"])
    objective = _Regression()  # the loop all-reduces its gradients (no DDP wrapper)
    loop = TrainLoop(cfg, objective, job["work"], "regression", rank=rank_world()[0])

    def data(position):
        stream = sample_stream(job["files"], 7, position, 5, rank_world()[0], world, job["streams"])
        while True:
            yield torch.tensor([float(next(stream)[1]["txt"]) for _ in range(cfg.batch_size)])

    loop.run(data, max_steps=job["max_steps"])
    return {"step": loop.step, "position": loop.position,
            "weights": [p.detach().flatten().tolist() for p in objective.model.parameters()]}


@pytest.mark.slow  # two Ray Train runs: about a minute on 2 cores
def test_a_two_worker_checkpoint_resumes_on_one_worker_as_a_one_worker_run(ray_local, tmp_path):
    files = _tars(tmp_path / "tars")
    straight = _run({"files": files, "streams": 2, "work": tmp_path / "straight", "max_steps": None})
    job = {"files": files, "streams": 2, "work": tmp_path / "moved", "max_steps": 3}
    first = fit(_run, job, WorkersConfig(num_workers=2), RayConfig(), tmp_path)
    assert first["step"] == 3 and first["position"] == 3 * GLOBAL_BATCH // 2
    resumed = _run(job | {"max_steps": None})  # the same work dir, now on one worker
    assert resumed["step"] == STEPS and resumed["position"] == straight["position"] == STEPS * GLOBAL_BATCH
    for a, b in zip(straight["weights"], resumed["weights"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6), (a, b)
    assert straight["weights"] != [p.flatten().tolist() for p in _Regression().model.parameters()]  # it trained
    # negative control: without data_streams the split follows the workers, and the checkpoint says so
    job = {"files": files, "streams": None, "work": tmp_path / "default", "max_steps": 3}
    fit(_run, job, WorkersConfig(num_workers=2), RayConfig(), tmp_path)
    with pytest.raises(UserError, match="written by 2 workers, resumed on 1.*train.data_streams"):
        _run(job | {"max_steps": None})


def test_with_data_streams_the_version_holds_the_global_batch_not_the_worker_count():
    def versions(*overrides):
        cfg = load_config("tiny", overrides=list(overrides))
        inputs = {"tokens": "t", "shards": "s", "segments": "g", "vqgan-high": "h"}
        return (output_versions(train_base, cfg, {"tokens": "t"})["base"],
                output_versions(train_vqgan, cfg, inputs)["vqgan-low"],
                output_versions(finetune_decoder, cfg, inputs)["decoder"])

    split = ["train_base.train.data_streams=4", "train_vqgan.train.data_streams=4",
             "finetune_decoder.train.data_streams=4"]
    one = versions(*split, "train_base.train.batch_size=32", "train_vqgan.train.batch_size=8",
                   "finetune_decoder.train.batch_size=4")
    two = versions(*split, "train_base.train.batch_size=16", "train_base.workers.num_workers=2",
                   "train_vqgan.train.batch_size=4", "train_vqgan.workers.num_workers=2",
                   "finetune_decoder.train.batch_size=2", "finetune_decoder.workers.num_workers=2")
    assert one == two
    # another global batch is another run; without data_streams the worker count is in the version
    assert versions(*split)[0] != versions(*split, "train_base.train.batch_size=16")[0]
    assert versions()[0] != versions("train_base.workers.num_workers=2")[0]
    # where the workers run is not
    assert versions()[0] == versions("train_base.workers.use_gpu=true", "train_base.workers.cpus_per_worker=2")[0]


def test_a_data_split_that_does_not_divide_is_a_config_error(tmp_path):
    loop_cfg = TrainConfig(steps=1, batch_size=6, data_streams=4, warmup_steps=0)
    loop = TrainLoop(loop_cfg, _Regression(), tmp_path / "w", "regression")
    with pytest.raises(ConfigError, match="train.batch_size 6 does not split over the 4 data streams"):
        loop.run(lambda position: iter(()))
