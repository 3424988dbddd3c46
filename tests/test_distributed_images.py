"""Ray Train data parallelism of the pixel models: the tokenizers and the finetuned decoder.

Their objectives play a GAN (two optimizers, gradients taken at the decoder's last layer), so the
loop averages their gradients itself (`muse.distributed.average_gradients`) and the codebook
all-reduces its EMA statistics; two gloo workers must then train like one on the union batch.
"""

from __future__ import annotations

import sys

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from muse.config import RayConfig, TrainConfig, VQLossConfig, VQModelConfig, WorkersConfig
from muse.distributed import fit, rank_world
from muse.models.vqgan import VQModel
from muse.stage import execute
from muse.stages.train_vqgan import ImageObjective
from muse.training import TrainLoop, seeded

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import tests/

MODEL = VQModelConfig(arch="vqvae", resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, embed_dim=8,
                      codebook_size=16, code_dim=4, use_cosine_sim=False, threshold_ema_dead_code=0)
BATCH = 8


def _images() -> torch.Tensor:
    return torch.rand(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _train(job: dict) -> dict:
    """A few loop steps of the image tokenizer's objective on this rank's share of a fixed batch
    (`job["share"]`: "rank" splits it over the workers, "half" trains one process on the first half)."""
    rank, world = rank_world()
    with seeded(0):
        model = VQModel(MODEL)
    objective = ImageObjective(model, VQLossConfig(**job["loss"]), None)
    cfg = TrainConfig(steps=job["steps"], batch_size=BATCH, lr=1e-2, warmup_steps=1, ema_decay=0.0,
                      checkpoint_every=1000, log_every=1000)
    x = _images()
    x = x[rank::world] if job["share"] == "rank" else x[:BATCH // 2]
    loop = TrainLoop(cfg, objective, job["dir"], "vq", "cpu", rank=rank)

    def data(position):
        while True:
            yield x

    loop.run(data)
    weights = {f"{name}.{k}": v.detach().contiguous() for name, m in objective.modules.items()
               for k, v in m.state_dict().items()}
    save_file(weights, f"{job['dir']}/rank{rank}.safetensors")
    return {"world": world}


def _run(tmp_path, name: str, workers: int, share: str = "rank", steps: int = 2, **loss) -> list[dict]:
    work = tmp_path / name
    work.mkdir()
    job = {"dir": str(work), "share": share, "steps": steps,
           "loss": {"l2_weight": 1.0, "disc_weight": 0.0, **loss}}
    assert fit(_train, job, WorkersConfig(num_workers=workers), RayConfig(), work)["world"] == workers
    return [load_file(str(work / f"rank{r}.safetensors")) for r in range(workers)]


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4) for k in a)


def test_two_gloo_workers_train_the_tokenizer_like_one_worker_on_the_union_batch(ray_local, tmp_path):
    (one,) = _run(tmp_path, "one", 1)
    two, _ = _run(tmp_path, "two", 2)
    assert _close(one, two)
    assert any("embed_avg" in k for k in one)  # the codebook's EMA statistics are compared too
    # negative control: one worker on the first half alone (no averaging) trains another model
    (half,) = _run(tmp_path, "half", 1, share="half")
    assert not _close(one, half)
    assert not torch.allclose(one["vq.quantizer._codebook.embed_avg"], half["vq.quantizer._codebook.embed_avg"])


def test_the_gan_branch_keeps_both_workers_replicas_identical(ray_local, tmp_path):
    """With the discriminator on, each rank weighs its GAN term by its own adaptive weight (the math differs
    from one worker there), but averaged gradients keep the generator and discriminator equal on every rank."""
    rank0, rank1 = _run(tmp_path, "gan", 2, steps=3, disc_weight=0.5, disc_start=1, disc_layers=1, disc_ch=8)
    assert any(k.startswith("disc.") for k in rank0)
    assert _close(rank0, rank1)
    with seeded(0):
        start = {f"vq.{k}": v for k, v in VQModel(MODEL).state_dict().items()}
    assert not _close({k: v for k, v in rank0.items() if k.startswith("vq.")}, start)  # and it did train


@pytest.mark.slow  # four Ray Train runs: about two minutes
@pytest.mark.usefixtures("ray_local")
def test_train_vqgan_and_finetune_decoder_on_two_ray_train_workers(pipeline_store, store):
    from muse.stages import finetune_decoder, train_vqgan

    cfg, _, arts = pipeline_store
    two = WorkersConfig(num_workers=2)
    c = cfg.train_vqgan
    cfg = cfg.model_copy(update={
        "train_vqgan": c.model_copy(update={"workers": two, "train": c.train.model_copy(update={"steps": 2}),
                                            "overrides": {}}),
        "finetune_decoder": cfg.finetune_decoder.model_copy(update={  # the tokenizer's codes: no super-res here
            "superres_rows": 0, "workers": two, "train": cfg.finetune_decoder.train.model_copy(update={"steps": 2})})})
    out = {a.kind: a for a in execute(train_vqgan, cfg, {k: arts[k] for k in ("shards", "segments")}, store)}
    for kind in ("vqgan-low", "vqgan-high", "vqseg"):
        assert out[kind].manifest.metrics["workers"] == 2 and out[kind].manifest.metrics["steps"] == 2, kind
        # one worker is another version: the data is split another way
        assert out[kind].version != arts[kind].version, kind
    dec = execute(finetune_decoder, cfg, {"shards": arts["shards"], "vqgan-high": out["vqgan-high"]}, store)
    assert dec.manifest.metrics["workers"] == 2 and dec.manifest.metrics["steps"] == 2
    assert (dec.path / "model.safetensors").is_file()
