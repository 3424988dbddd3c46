"""GPU placement of concurrent stages, on pools of a fake device count."""

from __future__ import annotations

import threading
import time

import torch

from muse.config import WorkersConfig, load_config
from muse.placement import Demand, GpuPool, demand


def _run_concurrently(pool: GpuPool, needs: dict[str, Demand], hold: float = 0.2) -> dict[str, dict]:
    """Each stage takes its slots in its own thread (as the flow's concurrent tasks do) and holds them a while;
    returns each one's device and start / end times."""
    seen: dict[str, dict] = {}

    def stage(name: str, need: Demand) -> None:
        with pool.take(name, need) as device:
            start = time.perf_counter()
            time.sleep(hold)
            seen[name] = {"device": device, "start": start, "end": time.perf_counter()}

    threads = [threading.Thread(target=stage, args=item) for item in needs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_three_whole_gpu_stages_on_one_gpu_run_one_after_another():
    seen = _run_concurrently(GpuPool(1), {n: Demand(slots=1) for n in ("base", "superres", "decoder")})
    assert all(s["device"] == torch.device("cuda", 0) for s in seen.values())
    names = list(seen)
    assert not any(_overlap(seen[a], seen[b]) for i, a in enumerate(names) for b in names[i + 1:])


def test_on_three_gpus_they_run_side_by_side_each_on_its_own():
    seen = _run_concurrently(GpuPool(3), {n: Demand(slots=1) for n in ("base", "superres", "decoder")})
    assert sorted(s["device"].index for s in seen.values()) == [0, 1, 2]
    assert _overlap(seen["base"], seen["superres"]) and _overlap(seen["superres"], seen["decoder"])


def test_two_gpus_three_stages_never_put_two_on_one_device_at_once():
    seen = _run_concurrently(GpuPool(2), {n: Demand(slots=1) for n in ("base", "superres", "decoder")})
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if seen[a]["device"] == seen[b]["device"]:
                assert not _overlap(seen[a], seen[b]), (a, b)


def test_stages_per_gpu_lets_small_models_share_and_spreads_them_first():
    seen = _run_concurrently(GpuPool(2, stages_per_gpu=2), {n: Demand(slots=1) for n in ("a", "b")})
    assert {s["device"].index for s in seen.values()} == {0, 1}  # an idle GPU before a shared one
    seen = _run_concurrently(GpuPool(1, stages_per_gpu=2), {n: Demand(slots=1) for n in ("a", "b")})
    assert _overlap(seen["a"], seen["b"])


def test_local_ray_gpu_workers_take_the_whole_machine():
    seen = _run_concurrently(GpuPool(2), {"vqgan": Demand(whole_machine=True), "base": Demand(slots=1)})
    assert not _overlap(seen["vqgan"], seen["base"])
    assert seen["vqgan"]["device"] is None  # Ray Train picks its workers' GPUs


def test_no_gpu_or_no_demand_takes_nothing_and_never_waits():
    seen = _run_concurrently(GpuPool(0), {n: Demand(slots=1) for n in ("a", "b")})
    assert _overlap(seen["a"], seen["b"]) and seen["a"]["device"] is None
    seen = _run_concurrently(GpuPool(1), {"shard": Demand(), "tokenize": Demand()})
    assert _overlap(seen["shard"], seen["tokenize"])


def test_demand_follows_each_stage_config():
    cfg = load_config("muse-256")
    assert demand("train-base", cfg, 8) == Demand(slots=1)
    assert demand("shard", cfg, 8) == Demand() and demand("evaluate", cfg, 8) == Demand()
    assert demand("train-base", cfg, 0) == Demand()
    gpu_workers = WorkersConfig(num_workers=4, use_gpu=True)
    local = cfg.model_copy(update={"train_vqgan": cfg.train_vqgan.model_copy(update={"workers": gpu_workers})})
    assert demand("train-vqgan", local, 8) == Demand(whole_machine=True)
    cluster = local.model_copy(update={"ray": local.ray.model_copy(update={"address": "auto"})})
    assert demand("train-vqgan", cluster, 8) == Demand()  # the cluster places them
    cpu_workers = cfg.model_copy(update={"finetune_decoder": cfg.finetune_decoder.model_copy(
        update={"workers": WorkersConfig(num_workers=2)})})
    assert demand("finetune-decoder", cpu_workers, 8) == Demand()
