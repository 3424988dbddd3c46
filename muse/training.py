"""The training loop every training stage shares: optimizers, schedule, EMA, precision, checkpoints, logs.

A stage supplies an `Objective`: the modules to train, which optimizer updates
which modules, and `losses(batch, step)` returning one loss per optimizer (plus
figures to log). The loop owns everything else, torchtitan-style, so models stay
free of training concerns:

- AdamW (or Muon, `muse.muon`) per optimizer, linear warmup then cosine or constant LR, grad clipping;
- gradient accumulation; bf16 autocast on GPU, fp32 on CPU;
- EMA copies of chosen modules;
- checkpoints in the artifact's `.work/` dir (modules, optimizers, schedules, EMA,
  step, data position, RNG states), written atomically; a rerun resumes from the
  last one and continues exactly as if never interrupted; with `train.data_streams`
  set it may resume on another worker count (the same samples in every step);
- a non-finite loss stops training with an error naming the step, the last good
  checkpoint untouched;
- progress bar, logged figures (losses, samples/s, ETA) and TensorBoard events.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import pickle
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from muse.config import ConfigError, TrainConfig
from muse.progress import report
from muse.errors import UserError
from muse.distributed import autocast, average_gradients, broadcast_buffers, rank_world
from muse.muon import MuonAdamW, hidden_matrices

log = logging.getLogger("muse.training")
CHECKPOINT = "checkpoint.pt"
TRAINED = "trained.safetensors"  # rank 0's final (EMA) weights in the work dir, read back by the stage's driver
SAMPLES_DIR = "samples"


class WorkerJob:
    """Base of the picklable jobs a stage hands to `muse.distributed.fit`: where rank 0 leaves the weights."""

    work_dir: Path

    @property
    def trained_path(self) -> Path:
        return self.work_dir / TRAINED


class Objective(Protocol):
    modules: dict[str, nn.Module]  # everything trained and checkpointed
    optimizers: dict[str, list[str]]  # optimizer name -> the modules it updates
    ema: list[str]  # modules that also get an EMA copy

    def losses(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One scalar per optimizer name (backpropagated into its modules only) plus extra figures to log."""

    # Optional: `rate_figures(samples_per_s) -> {"tokens_per_s": ..., "flops_per_s": ...}`, logged with the
    # loss (and MFU from flops_per_s when train.peak_tflops is set).
    # Optional: `generator`, a torch.Generator the objective draws its randomness from (masks, condition
    # dropout) instead of the global RNG, which stages training in concurrent threads share; the loop
    # checkpoints and restores its state, so a resumed run still continues exactly.
    # Optional: `averages_gradients = True` when the objective's forward is DDP-wrapped (backward averages the
    # gradients over the workers); otherwise the loop averages them itself before each optimizer step.


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine to 0 over the remaining steps (or constant)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def make_optimizer(cfg: TrainConfig, modules: list[nn.Module], device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trained parameters of `modules` (fused into one kernel on a GPU), bitsandbytes' 8-bit
    AdamW, or Muon on their hidden matrices (every nn.Linear but an output `head`) with AdamW on the rest."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        hidden = set().union(*(hidden_matrices(m, skip=("head",)) for m in modules))
        groups = [{"params": [p for p in params if id(p) in hidden], "muon": True},
                  {"params": [p for p in params if id(p) not in hidden], "muon": False}]
        return MuonAdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                         weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer adamw8bit needs bitsandbytes: pip install 'muse-pipeline[bnb]'") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def checkpoint_blocks(module: nn.Module) -> int:
    """Activation checkpointing from outside the model: every block of every `blocks` list in `module` (a
    transformer's layers) and every module marked `checkpoint_unit` (a conv net's residual and attention blocks)
    recomputes its activations in backward (its state-dict keys stay as they are); returns how many units."""
    units = {id(b): b for m in module.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)
             for b in m.blocks}
    units |= {id(m): m for m in module.modules() if getattr(m, "checkpoint_unit", False)}
    for unit in units.values():
        unit.forward = functools.partial(_checkpointed, unit.forward)
    return len(units)


def _checkpointed(forward: Callable, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def check_data_split(cfg: TrainConfig, world: int) -> None:
    """`train.data_streams` must split evenly over the workers, and each worker's batch over its streams."""
    streams = cfg.data_streams
    if streams is None:
        return
    if streams % world:
        raise ConfigError(f"train.data_streams {streams} is not a multiple of the {world} workers")
    if cfg.batch_size % (streams // world):
        raise ConfigError(f"train.batch_size {cfg.batch_size} does not split over the {streams // world} data "
                          f"streams each of the {world} workers reads (train.data_streams {streams})")


def _rng_state() -> dict:
    """The global RNGs as tensors and plain values, so a checkpoint loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_device(batch, device: torch.device):
    """A tensor, or a dict of tensors and other values (captions), on `device`."""
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


def batch_len(batch) -> int:
    """Samples in a tensor batch or a dict batch (its first tensor's leading dimension)."""
    if isinstance(batch, dict):
        return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    return batch.shape[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_GLOBAL_RNG = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global RNGs and keep them to this thread while it builds its modules: train-base and
    train-superres run in concurrent threads of one flow run, and without the lock one thread's draws
    would land between the other's seed and its weight init, so the initial weights (hence the models)
    would change from run to run."""
    with _GLOBAL_RNG:
        seed_everything(seed)
        yield


def record_training(work_dir: Path, artifact_dir: Path, figures: dict[str, float], grids: int = 4) -> dict[str, float]:
    """Copy a finished run's TensorBoard events and its last `grids` sample grids (as `previews/samples-*.png`)
    into the artifact being committed; returns the last logged figures as `train_*` metrics."""
    from muse.artifacts.store import PREVIEW_DIR

    if (work_dir / "tensorboard").is_dir():
        shutil.copytree(work_dir / "tensorboard", artifact_dir / "tensorboard")
    saved = sorted((work_dir / SAMPLES_DIR).glob("step-*.png"))[-grids:] if grids else []
    if saved:
        (artifact_dir / PREVIEW_DIR).mkdir(exist_ok=True)
        for path in saved:
            shutil.copy(path, artifact_dir / PREVIEW_DIR / f"samples-{path.name}")
    return {f"train_{k}": round(v, 4) for k, v in figures.items() if "/" not in k}


class TrainingDiverged(UserError, FloatingPointError):
    """Losses or weights stopped being finite (a learning rate too high, bad data); the last good checkpoint stays."""


class TrainLoop:
    """Runs an Objective for `cfg.steps` optimizer steps, checkpointing into `work_dir`."""

    def __init__(self, cfg: TrainConfig, objective: Objective, work_dir: Path, name: str,
                 device: torch.device | str = "cpu", rank: int = 0):
        """`rank` > 0 (a data-parallel worker other than the first) trains but writes nothing: no checkpoint,
        log, progress bar or TensorBoard event."""
        self.cfg, self.objective, self.work_dir, self.name = cfg, objective, Path(work_dir), name
        self.rank = rank
        self.device = torch.device(device)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.optimizers = {
            opt: make_optimizer(cfg, [objective.modules[m] for m in mods], self.device)
            for opt, mods in objective.optimizers.items()
        }
        self.schedules = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)) for k, o in self.optimizers.items()}
        self.ema = {m: copy.deepcopy(objective.modules[m]).eval().requires_grad_(False) for m in objective.ema} \
            if cfg.ema_decay > 0 else {}
        if cfg.activation_checkpointing:  # after the EMA copies, which never run backward
            for module in objective.modules.values():
                checkpoint_blocks(module)
        if cfg.compile:  # in place: the state-dict keys (checkpoints, EMA, artifacts) stay those of the eager module
            for module in objective.modules.values():
                module.compile()
        self.generator: torch.Generator | None = getattr(objective, "generator", None)
        self.step = 0
        self.position = 0  # samples consumed: where the data stream resumes
        self.saved_step: int | None = None  # step of the checkpoint on disk
        self.figures: dict[str, float] = {}  # the last step's figures, checkpointed: a rerun after the end reports them

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / CHECKPOINT

    def save(self) -> None:
        """Write the checkpoint atomically: a crash mid-write leaves the previous one intact, and weights that
        are no longer finite (a diverged update) never replace it."""
        for k, m in self.objective.modules.items():
            if not all(bool(torch.isfinite(p).all()) for p in m.parameters()):
                last = "none" if self.saved_step is None else f"step {self.saved_step}"
                raise TrainingDiverged(f"{self.name}: {k} weights are not finite after step {self.step}; training "
                                         f"stopped, last good checkpoint: {last} ({self.checkpoint_path})")
        state = {
            "step": self.step, "position": self.position, "world": rank_world()[1], "rng": _rng_state(),
            "generator": None if self.generator is None else self.generator.get_state(),
            "modules": {k: m.state_dict() for k, m in self.objective.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedules": {k: s.state_dict() for k, s in self.schedules.items()},
            "ema": {k: m.state_dict() for k, m in self.ema.items()},
            "figures": self.figures,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as an `inline_container.cc` RuntimeError
            tmp.unlink(missing_ok=True)
            free = shutil.disk_usage(tmp.parent).free
            raise OSError(f"{self.name}: could not write checkpoint {tmp} ({free / 2**20:.0f} MiB free there): "
                          f"{str(e).splitlines()[0]}") from None
        os.replace(tmp, self.checkpoint_path)
        self.saved_step = self.step

    def resume(self) -> bool:
        """Load the last checkpoint if there is one; True when resumed."""
        if not self.checkpoint_path.is_file():
            return False
        try:  # tensors and plain data only: unpickling a planted file must not run its code
            state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"{self.checkpoint_path}: not a checkpoint of tensors and plain data (written by an older "
                            f"muse, or tampered with); delete it or rerun with --force ({str(e).splitlines()[0]})"
                            ) from None
        for k, m in self.objective.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedules.items():
            s.load_state_dict(state["schedules"][k])
        for k, m in self.ema.items():
            m.load_state_dict(state["ema"][k])
        self.step, self.position = state["step"], self._position_here(state)
        self.figures = dict(state.get("figures", {}))  # absent in checkpoints written before figures were kept
        self.saved_step = self.step
        _set_rng_state(state["rng"])
        if self.generator is not None and state.get("generator") is not None:  # None: written before objectives had one
            self.generator.set_state(state["generator"])
        log.info("%s: resumed from %s at step %d", self.name, self.checkpoint_path, self.step)
        return True

    def _position_here(self, state: dict) -> int:
        """This worker's data position from a checkpoint that `state["world"]` workers wrote: every worker
        consumes as many samples per step, so the global position divides over another count (the version
        keeps the global batch when `train.data_streams` is set, and a count that changes it never reaches
        this checkpoint)."""
        world = rank_world()[1]
        written = state.get("world", world)  # absent: written before worker counts could change
        if written == world:
            return state["position"]
        if self.cfg.data_streams is None:
            raise UserError(f"{self.checkpoint_path}: written by {written} workers, resumed on {world}; the data "
                            f"split follows the worker count unless train.data_streams is set")
        consumed = state["position"] * written
        log.info("%s: the checkpoint of %d workers resumes on %d (%d samples in)", self.name, written, world,
                 consumed)
        return consumed // world

    # ------------------------------------------------------------------ training

    def _update_ema(self) -> None:
        """ema <- ema + (1 - decay) (live - ema) for float tensors (one batched lerp), copy the rest."""
        with torch.no_grad():
            for name, ema in self.ema.items():
                live = self.objective.modules[name].state_dict()
                pairs = [(v, live[k].detach()) for k, v in ema.state_dict().items()]
                floats = [(e, w) for e, w in pairs if e.dtype.is_floating_point]
                if floats:  # a loop of mul_/add_ costs two kernel launches per tensor
                    torch._foreach_lerp_([e for e, _ in floats], [w for _, w in floats], 1 - self.cfg.ema_decay)
                for e, w in pairs:
                    if not e.dtype.is_floating_point:
                        e.copy_(w)

    def run(self, data: Callable[[int], Iterator[torch.Tensor]], max_steps: int | None = None,
            preview: Callable[["TrainLoop"], np.ndarray] | None = None) -> dict[str, float]:
        """Train until cfg.steps (or stop early after `max_steps` more, for tests); returns the last figures.

        `data(position)` returns an iterator of micro-batches starting after `position` samples.
        `preview(loop)`, called at every checkpoint, returns an image grid (HWC uint8) that is saved as
        `work_dir/samples/step-NNNNNNN.png` and logged to TensorBoard.
        """
        cfg = self.cfg
        check_data_split(cfg, rank_world()[1])
        self.resume()
        if self.rank > 0:  # the checkpoint holds rank 0's RNG: give this rank its own masks and dropout
            rank_seed = hash((cfg.seed, self.rank, self.step)) % 2**31  # ints only: str hashes differ per process
            seed_everything(rank_seed)
            if self.generator is not None:
                self.generator.manual_seed(rank_seed)
        end = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        batches = data(self.position)
        params = {opt: [p for m in mods for p in self.objective.modules[m].parameters() if p.requires_grad]
                  for opt, mods in self.objective.optimizers.items()}
        sync_replicas = rank_world()[1] > 1 and not getattr(self.objective, "averages_gradients", False)
        writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            if self.rank == 0:
                writer = SummaryWriter(log_dir=str(self.work_dir / "tensorboard"), purge_step=self.step)
        except ImportError:  # tensorboard is optional
            pass
        figures = dict(self.figures)
        last_step, t_last = self.step, time.perf_counter()
        # A bar on a terminal only (None: off when stderr is not a TTY); log files get the logged figures instead.
        bar = tqdm(total=end, initial=self.step, desc=self.name, unit="step", mininterval=2.0,
                   disable=None if self.rank == 0 else True)
        for m in self.objective.modules.values():
            m.train()
        try:
            while self.step < end:
                sums: dict[str, torch.Tensor] = {}  # on the device: one host sync per step, not one per figure
                samples = 0
                for _ in range(cfg.grad_accum):
                    batch = to_device(next(batches), self.device)
                    samples += batch_len(batch)
                    with autocast(self.device, cfg.precision):
                        losses = self.objective.losses(batch, self.step)
                    for k, v in losses.items():
                        value = torch.as_tensor(v, device=self.device).detach().float()
                        sums[k] = sums.get(k, 0.0) + value / cfg.grad_accum
                    for opt, ps in params.items():
                        if opt in losses and losses[opt].requires_grad:
                            (losses[opt] / cfg.grad_accum).backward(inputs=ps)
                if sync_replicas:
                    for ps in params.values():
                        average_gradients(ps)
                for opt, o in self.optimizers.items():
                    if cfg.grad_clip > 0:
                        sums[f"grad_norm/{opt}"] = torch.nn.utils.clip_grad_norm_(params[opt], cfg.grad_clip)
                    o.step()
                    o.zero_grad(set_to_none=True)
                    self.schedules[opt].step()
                values = dict(zip(sums, torch.stack(list(sums.values())).tolist()))
                for k, value in values.items():  # before any checkpoint of this step: the one on disk stays good
                    if not math.isfinite(value):
                        last = "none" if self.saved_step is None else f"step {self.saved_step}"
                        raise TrainingDiverged(
                            f"{self.name}: non-finite {k} ({value}) at step {self.step}; "
                            f"training stopped, last good checkpoint: {last} ({self.checkpoint_path})"
                        )
                if sync_replicas:
                    broadcast_buffers(list(self.objective.modules.values()))
                self._update_ema()
                self.step += 1
                self.position += samples
                bar.update(1)
                figures = self.figures = values
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == end):
                    now = time.perf_counter()  # rates over the last interval: what the run does now
                    rate = (self.step - last_step) / max(now - t_last, 1e-9)
                    last_step, t_last = self.step, now
                    figures["samples_per_s"] = rate * samples
                    figures["lr"] = self.schedules[next(iter(self.schedules))].get_last_lr()[0]
                    if hasattr(self.objective, "rate_figures"):
                        figures.update(self.objective.rate_figures(figures["samples_per_s"]))
                        if cfg.peak_tflops and "flops_per_s" in figures:
                            figures["mfu"] = figures["flops_per_s"] / (cfg.peak_tflops * 1e12)
                    eta = (end - self.step) / max(rate, 1e-9)
                    report(self.name, self.step, end, eta)
                    log.info("%s step %d/%d  %s  %.1f samples/s  ETA %.0fs", self.name, self.step, end,
                             "  ".join(f"{k}={v:.4g}" for k, v in values.items()), figures["samples_per_s"], eta)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(values.items())[:3]})
                    if writer is not None:
                        for k, v in figures.items():
                            writer.add_scalar(f"{self.name}/{k}", v, self.step)
                if self.rank == 0 and (self.step % cfg.checkpoint_every == 0 or self.step == end):
                    self.save()
                    if preview is not None:
                        self._save_preview(preview(self), writer)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return figures

    def _save_preview(self, grid: np.ndarray, writer) -> None:
        (self.work_dir / SAMPLES_DIR).mkdir(exist_ok=True)
        Image.fromarray(grid).save(self.work_dir / SAMPLES_DIR / f"step-{self.step:07d}.png")
        if writer is not None:
            writer.add_image(f"{self.name}/samples", grid, self.step, dataformats="HWC")

    def save_trained(self, name: str) -> None:
        """Rank 0 writes module `name`'s trained weights (`trained`) to `work_dir/TRAINED` for the driver."""
        if self.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.trained(name).state_dict().items()},
                      str(self.work_dir / TRAINED))

    def trained(self, name: str) -> nn.Module:
        """The module to export: its EMA copy when EMA is on, else the live one."""
        return self.ema.get(name, self.objective.modules[name])
