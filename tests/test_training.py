"""The shared training loop: exact resume, non-finite losses, LR schedule."""

import shutil

import pytest
import torch
from torch import nn

from muse.config import TrainConfig, VQLossConfig, VQModelConfig
from muse.datasets.demo import write_folder
from muse.datasets.stream import batches, sample_stream
from muse.models.vqgan import VQModel
from muse.datasets.decode import image_decoder
from muse.stages.train_vqgan import ImageObjective
from muse.training import TrainLoop, lr_lambda, seed_everything


def _loop(tmp_path, files, steps, work="work"):
    seed_everything(0)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=100,
                      ema_decay=0.9, shuffle_buffer=8, grad_accum=2)
    model = VQModel(VQModelConfig(resolution=32, ch=8, ch_mult=(1, 2, 2), embed_dim=8, codebook_size=32, code_dim=4,
                                  threshold_ema_dead_code=1))
    objective = ImageObjective(model, VQLossConfig(disc_weight=0.5, disc_start=3, disc_ch=8, disc_layers=2), None)
    loop = TrainLoop(cfg, objective, tmp_path / work, "test")
    decode = image_decoder(32)
    return loop, lambda pos: batches(sample_stream(files, 0, pos, cfg.shuffle_buffer), cfg.batch_size, decode)


def _tars(tmp_path):
    import webdataset as wds

    src = write_folder(tmp_path / "demo", num_samples=24, image_size=32, seed=0)
    out = tmp_path / "tars"
    out.mkdir()
    for t in range(2):
        with wds.TarWriter(str(out / f"{t:06d}.tar")) as w:
            for i in range(t * 12, t * 12 + 12):
                w.write({"__key__": f"{i:06d}", "png": (src / f"{i:06d}.png").read_bytes()})
    return sorted(out.glob("*.tar"))


def test_resume_equals_an_uninterrupted_run(tmp_path):
    files = _tars(tmp_path)
    straight, data = _loop(tmp_path, files, steps=8, work="straight")
    straight.run(data)

    first, data = _loop(tmp_path, files, steps=8, work="interrupted")
    first.run(data, max_steps=4)  # "killed" after 4 steps (checkpoint at 4)
    assert first.step == 4
    resumed, data = _loop(tmp_path, files, steps=8, work="interrupted")  # a new process: fresh objects
    resumed.run(data)
    assert resumed.step == 8 and resumed.position == straight.position == 8 * 4 * 2
    for name in ("vq", "disc"):
        a, b = straight.objective.modules[name].state_dict(), resumed.objective.modules[name].state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    ea, eb = straight.trained("vq").state_dict(), resumed.trained("vq").state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_stream_is_deterministic_and_resumable(tmp_path):
    files = _tars(tmp_path)
    full = [k for k, _ in zip((key for key, _ in sample_stream(files, 3, 0, 5)), range(60))]
    assert len(set(full[:24])) == 24 and full[:24] != full[24:48]  # every sample once per epoch, reshuffled
    resumed = [k for k, _ in zip((key for key, _ in sample_stream(files, 3, 17, 5)), range(43))]
    assert resumed == full[17:60]
    ranks = [{k for k, _ in zip((key for key, _ in sample_stream(files, 3, 0, 5, rank=r, world=2)), range(12))}
             for r in (0, 1)]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == 24


class _Exploding:
    def __init__(self):
        self.net = nn.Linear(2, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"gen": ["net"]}
        self.ema = []

    def losses(self, batch, step):
        loss = self.net(batch).mean()
        return {"gen": loss * (float("nan") if step == 5 else 1.0)}


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=2, checkpoint_every=3, warmup_steps=0)
    loop = TrainLoop(cfg, _Exploding(), tmp_path, "nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gen \(nan\) at step 5.*last good checkpoint: step 3"):
        loop.run(lambda pos: iter(lambda: torch.ones(2, 2), None))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3


def test_warmup_then_cosine():
    f = lr_lambda(TrainConfig(steps=110, warmup_steps=10))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert lr_lambda(TrainConfig(steps=110, warmup_steps=10, schedule="constant"))(100) == 1.0


class _Transformer:
    """The masked-token objective of a small transformer on a fixed batch."""

    def __init__(self):
        from muse.models.transformer import MaskedTransformer, TransformerSpec

        torch.manual_seed(0)
        self.model = MaskedTransformer(TransformerSpec(dim=32, depth=2, heads=4, codebook_size=16, side=4, text_dim=8))
        self.modules = {"transformer": self.model}
        self.optimizers = {"gen": ["transformer"]}
        self.ema = ["transformer"]

    def losses(self, batch, step):
        tokens, text = batch["tokens"], batch["text"]
        inputs = tokens.masked_fill(torch.arange(16) % 3 == 0, self.model.spec.mask_id)
        memory, memory_mask = self.model.memory(text, torch.ones(text.shape[:2], dtype=torch.bool))
        logits = self.model(inputs, memory, memory_mask)
        return {"gen": torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens)}


@pytest.mark.slow  # inductor compiles C++ kernels on CPU: ~40 s on 2 cores
@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler (c++)")
def test_compiled_training_matches_eager_and_keeps_the_state_dict_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, 16, (4, 16), generator=g), "text": torch.randn(4, 3, 8, generator=g)}
    figures, states = {}, {}
    for compiled in (False, True):
        cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=0, ema_decay=0.9, compile=compiled)
        objective = _Transformer()
        loop = TrainLoop(cfg, objective, tmp_path / str(compiled), "t")
        figures[compiled] = loop.run(lambda pos: iter(lambda: batch, None))
        states[compiled] = loop.trained("transformer").state_dict()
    assert figures[True]["gen"] == pytest.approx(figures[False]["gen"], rel=1e-3)
    assert figures[True]["gen"] < 2.5  # it learned: ln(16) = 2.77 at the start
    assert states[True].keys() == states[False].keys()
    for k in states[False]:
        torch.testing.assert_close(states[True][k], states[False][k], rtol=1e-3, atol=1e-4)
