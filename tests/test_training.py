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
from muse.distributed import autocast
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
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3


class _Diverging(_Exploding):
    """Finite losses, but the update at step 4 makes the weights infinite (as lr=1e30 does)."""

    def losses(self, batch, step):
        if step == 4:
            with torch.no_grad():
                self.net.weight.fill_(float("inf"))
        return {"gen": self.net(batch).mean().clamp(-1e3, 1e3) if step != 4 else self.net.bias.sum()}


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=2, checkpoint_every=1, warmup_steps=0)
    loop = TrainLoop(cfg, _Diverging(), tmp_path, "inf")
    with pytest.raises(FloatingPointError, match=r"net weights are not finite after step 5.*last good checkpoint: step 4"):
        loop.run(lambda pos: iter(lambda: torch.ones(2, 2), None))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["modules"]["net"].values())


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch planted-by-checkpoint",)


def test_a_planted_checkpoint_does_not_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    torch.save({"step": _Payload()}, tmp_path / "work" / "checkpoint.pt")
    loop = TrainLoop(TrainConfig(steps=2, batch_size=2, warmup_steps=0), _Exploding(), tmp_path / "work", "p")
    from muse.errors import UserError

    with pytest.raises(UserError, match=r"checkpoint.pt: not a checkpoint of tensors and plain data"):
        loop.resume()
    assert not (tmp_path / "planted-by-checkpoint").exists()


def test_a_rerun_after_the_last_step_reports_the_same_figures(tmp_path):
    """Killed between the last checkpoint and the commit: the rerun trains nothing and must commit the same figures."""
    files = _tars(tmp_path)
    first, data = _loop(tmp_path, files, steps=6)
    figures = first.run(data)
    again, data = _loop(tmp_path, files, steps=6)
    assert again.run(data) == figures and again.step == 6 and "rec" in figures


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_last_one(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=4, batch_size=2, checkpoint_every=2, warmup_steps=0)
    loop = TrainLoop(cfg, _Exploding(), tmp_path, "full")
    real_save = torch.save

    def save(obj, path, *a, **k):
        if obj["step"] == 4:  # the disk fills up before the second checkpoint
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match=r"full: could not write checkpoint .*checkpoint.tmp \(\d+ MiB free there\)"):
        loop.run(lambda pos: iter(lambda: torch.ones(2, 2), None))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "checkpoint.tmp").exists()


def test_no_progress_bar_is_written_where_stderr_is_not_a_terminal(tmp_path, capsys):
    """Log files stay readable: no carriage-return bar frames when stderr is a file or a pipe."""
    cfg = TrainConfig(steps=6, batch_size=2, warmup_steps=0, log_every=3)
    TrainLoop(cfg, _Exploding(), tmp_path, "quiet").run(lambda pos: iter(lambda: torch.ones(2, 2), None), max_steps=4)
    err = capsys.readouterr().err
    assert "\r" not in err and "quiet:" not in err


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


class _Linear:
    """A least-squares objective on one linear layer, with an EMA copy."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Linear(2, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"gen": ["net"]}
        self.ema = ["net"]

    def losses(self, batch, step):
        return {"gen": (self.net(batch) - 1).pow(2).mean()}


def test_ema_is_the_decayed_average_of_the_live_weights(tmp_path):
    objective = _Linear()
    start = {k: v.clone() for k, v in objective.net.state_dict().items()}
    cfg = TrainConfig(steps=1, batch_size=2, lr=0.1, warmup_steps=0, ema_decay=0.75)
    loop = TrainLoop(cfg, objective, tmp_path, "e")
    loop.run(lambda pos: iter(lambda: torch.ones(2, 2), None))
    live = objective.net.state_dict()
    for k, v in loop.trained("net").state_dict().items():
        torch.testing.assert_close(v, 0.75 * start[k] + 0.25 * live[k])
        assert not torch.equal(live[k], start[k])  # the step moved the weights


def test_logged_throughput_covers_the_last_interval_not_the_slow_first_steps(tmp_path):
    import time

    def data(position):
        time.sleep(1.0)  # a slow first batch (a CUDA context, a cold cache) that later intervals must not carry
        while True:
            yield torch.ones(2, 2)

    loop = TrainLoop(TrainConfig(steps=40, batch_size=2, warmup_steps=0, log_every=20), _Linear(), tmp_path, "r")
    figures = loop.run(data)
    assert figures["samples_per_s"] > 2 * 40 / 1.0  # since the start it would be under 80 samples/s


def test_autocast_is_bf16_on_request_or_on_a_gpu_and_fp32_on_a_cpu_by_default():
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32


def test_progress_goes_to_the_reporter_of_its_context_and_never_stops_the_work(tmp_path):
    from muse.progress import report, reporting

    seen = []
    report("base", 1, 2)  # no reporter: nothing happens
    with reporting(lambda *args: seen.append(args)):
        report("base", 1, 2, 5.0)

        def broken(*args):
            raise RuntimeError("the UI is down")

        with reporting(broken):
            report("base", 2, 2)  # swallowed
        report("base", 2, 2, 0.0)
    report("base", 3, 2)
    assert seen == [("base", 1, 2, 5.0), ("base", 2, 2, 0.0)]


def test_superres_code_pairs_resume_exactly_and_split_between_ranks(tmp_path):
    """`pair_batches` from a data position continues the stream from 0 sample for sample (across epochs), and
    two ranks read disjoint halves of the pairs."""
    import itertools

    import numpy as np

    from muse.superres_codes import pair_batches

    path = tmp_path / "pairs.npz"
    np.savez(path, codes=np.arange(10)[:, None].repeat(4, 1), images=np.zeros((10, 2, 2, 3), np.uint8))

    def ids(position, rank=0, world=1, n=7):
        return [int(c) for b in itertools.islice(pair_batches(path, 3, 5, position, rank, world), n)
                for c in b["codes"][:, 0]]

    whole = ids(0)
    assert sorted(whole[:10]) == list(range(10)) and whole[:10] != whole[10:20]  # one permutation per epoch
    assert ids(9, n=4) == whole[9:21]  # resumed after 9 samples: the same samples in the same order
    halves = [set(ids(0, rank, 2)) for rank in (0, 1)]
    assert halves == [{0, 2, 4, 6, 8}, {1, 3, 5, 7, 9}]
