"""The pieces every trainer shares: one distributed setup, seeding, EMA, mixed precision, one logger, one
checkpoint writer (``models/_checkpoint.write_checkpoint``, atomic; ``run_checkpoints`` finds and prunes the
files) and the step loop with gradient accumulation, resumable data position, periodic evaluation and
checkpoints, a final checkpoint at the end of every run and on SIGTERM / Ctrl-C (``stopping``).

Exact resume: the global RNGs (dropout, noise) are only drawn by the model; the data loader has a generator of
its own, seeded per rank and epoch, so rebuilding its iterator on resume draws nothing from them. All ranks
decide together, each step, whether to train, skip (a batch unreadable on some rank) or stop, so their data
positions never drift apart; every rank's position, skip count and RNG states are in the checkpoint.

A trainer subclasses :class:`Trainer` and fills in ``train_step`` (one optimisation step over a list of
micro-batches), ``evaluate``, ``model_state`` / ``extra_state`` / ``load_extra_state``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import json
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..models._checkpoint import publish_as, write_checkpoint
from . import run_checkpoints
from .data import DataError, ResumableSampler, collate_skipping
from .stopping import StopRequests

PRECISIONS = ("fp32", "bf16", "fp16")


# ------------------------------------------------------------------------------------------ distributed

@dataclasses.dataclass
class DistributedSetup:
    """World size, rank and device of this process. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
    environment) the default process group is created: gloo on the CPU, NCCL on CUDA."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    control_group: Any = None  # gloo group for per-step host flags under NCCL (no device sync per step)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str | None = None) -> "DistributedSetup":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        target = torch.device(device)
        if target.type == "cuda":
            target = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(target)
        owns = False
        if world > 1 and dist.is_available() and not dist.is_initialized():
            dist.init_process_group("nccl" if target.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
            owns = True
        control = None
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            if world > 1 and dist.get_backend() != "gloo":
                control = dist.new_group(backend="gloo")  # collective: every rank creates it
        return cls(rank, world, local_rank, target, owns, control)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.distributed:
            return float(value)
        tensor = torch.tensor(float(value), dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def total(self, value: int) -> int:
        if not self.distributed:
            return int(value)
        tensor = torch.tensor(int(value), dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return int(tensor)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks (one collective for all of them): every rank gets the same answer.
        Host flags travel over gloo (``control_group`` under NCCL), so asking costs no device synchronisation."""
        if not self.distributed:
            return tuple(bool(flag) for flag in flags)
        tensor = torch.tensor([int(bool(flag)) for flag in flags], dtype=torch.int32)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control_group)
        return tuple(bool(value) for value in tensor.tolist())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and Python's ``random`` (call with a per-rank seed)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types ``torch.load(weights_only=True)`` reads back."""
    kind, keys, position, gaussian, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(gaussian), "gauss": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])




# ------------------------------------------------------------------------------------------ EMA, precision

class ModelEMA:
    """Exponential moving average of a model's parameters (official ``update_ema``: ``ema = d ema + (1-d) p``
    over ``named_parameters``; buffers are copied). The copy is frozen and in eval mode."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        decay = self.decay if decay is None else decay
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
        ema_buffers = dict(self.module.named_buffers())
        for name, buffer in model.named_buffers():
            ema_buffers[name].copy_(buffer)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on ``device``; ``fp32``: none."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, active only for fp16 (otherwise a no-op with the same interface)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def wrap_ddp(module: nn.Module, device: torch.device, **options) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` with the gradients as views of its buckets (no second copy). Parameters
    with a size-1 dimension (class tokens, probes: ``(1, 1, C)``) can get a gradient that is a slice of a larger
    one, e.g. ``cat``'s backward with one sample per rank: strides ``(T*C, C, 1)`` where DDP's bucket view has
    ``(C, C, 1)``. DDP then warns and copies through a slow path; a hook gives those gradients the parameter's
    own strides first."""
    for param in module.parameters():
        if param.requires_grad and 1 in param.shape:
            param.register_hook(_with_strides_of(param))
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True, **options)


def _with_strides_of(param: nn.Parameter):
    strides = param.stride()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad is None or grad.layout != torch.strided or grad.stride() == strides:
            return grad
        return torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device).copy_(grad)

    return hook


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------ logging

class RunLogger:
    """Rank 0 writes every logged row to ``log.jsonl`` and to a CSV per kind (``log.csv`` for training rows,
    ``eval.csv`` for evaluations; the columns are those of the kind's first row, or of the existing file's
    header when a resumed run appends), plus TensorBoard scalars when ``tensorboard`` is installed and
    ``tensorboard=True``. Other ranks log nothing."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = out_dir
        self._writer = None
        self._fields: dict[str, list[str]] = {}
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                self._writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self._writer = None

    def log(self, step: int, row: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                                              for k, v in row.items()}}
        with open(os.path.join(self.out_dir, "log.jsonl"), "a") as handle:
            handle.write(json.dumps(row) + "\n")
        path = os.path.join(self.out_dir, "log.csv" if kind == "train" else f"{kind}.csv")
        new_file = not os.path.exists(path) or os.path.getsize(path) == 0
        if kind not in self._fields:
            if new_file:
                self._fields[kind] = list(row)
            else:
                with open(path, newline="") as handle:
                    self._fields[kind] = next(csv.reader(handle))
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._fields[kind], extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self._writer is not None:
            for key, value in row.items():
                if isinstance(value, float):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# ------------------------------------------------------------------------------------------ the loop

@dataclasses.dataclass
class LoopConfig:
    """What every run has. ``batch_size`` is global (over ranks and accumulation)."""

    data: str = ""
    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    ema_decay: float = 0.0  # 0: no EMA
    seed: int = 0
    num_workers: int = 2
    threads: int = 0  # torch intra-op threads on the CPU; 0: choose (see Trainer.choose_threads)
    log_every: int = 10
    eval_every: int = 500
    ckpt_every: int = 500  # 0: only the final checkpoint
    keep_last: int = 0  # step files kept (0: all); last.pt always
    eval_data: str | None = None
    eval_count: int = 8
    resume: str | None = None
    device: str | None = None
    progress: bool = True
    tensorboard: bool = True

    def resolved_precision(self, device: torch.device) -> str:
        precision = self.precision
        if precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {('auto',) + PRECISIONS}, got {precision!r}")
        return precision


class Trainer:
    """The step loop. Subclasses set ``self.model`` (possibly DDP-wrapped), ``self.dataset`` and implement
    the hooks. ``run()`` trains to ``config.steps`` and returns the last logged row."""

    name = "train"

    def __init__(self, config: LoopConfig, setup: DistributedSetup | None = None):
        self.config = config
        self.setup = setup or DistributedSetup.from_environment(config.device)
        self.device = self.setup.device
        self.precision = config.resolved_precision(self.device)
        if config.steps < 0:
            raise ValueError(f"steps must be >= 0, got {config.steps}")
        if config.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {config.grad_accum}")
        per_rank, remainder = divmod(config.batch_size, self.setup.world_size)
        if remainder or per_rank == 0 or per_rank % config.grad_accum:
            raise ValueError(f"the global batch {config.batch_size} must split evenly over {self.setup.world_size} "
                             f"process(es) and {config.grad_accum} accumulation step(s)")
        self.per_rank_batch = per_rank
        self.micro_batch = per_rank // config.grad_accum
        if config.ckpt_every < 0 or config.keep_last < 0:
            raise ValueError(f"ckpt_every and keep_last must be >= 0, got {config.ckpt_every} and {config.keep_last}")
        self.seed_rank()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches this rank consumed (trained on or skipped) in the epoch
        self.skipped = 0  # this rank's unreadable samples
        self.loaded = 0  # this rank's samples consumed, readable or not
        self.saved_step = 0  # the step of the newest checkpoint (written or resumed from)
        self.saved_here = False  # whether this run wrote a checkpoint into its own out_dir
        self.stopped_by: str | None = None  # why run() stopped before config.steps (a signal, the launcher)
        self.logger: RunLogger | None = None  # made by run(): a run rejected while building leaves no folder

    def seed_rank(self) -> None:
        """Seed every global RNG with ``seed * 1000 + rank``: deterministic, different per rank. Trainers call
        it again after building their model from ``seed`` (the same initial weights on every rank)."""
        seed_everything(self.config.seed * 1000 + self.setup.rank)

    # -------------------------------------------------------------------- hooks
    def train_step(self, micro_batches: list) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def model_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def per_rank_state(self) -> dict[str, Any]:
        """This rank's own state that a resume must restore on the same rank (e.g. a private generator);
        gathered from every rank when a checkpoint is written."""
        return {}

    def load_per_rank_state(self, state: dict[str, Any]) -> None:
        pass

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -------------------------------------------------------------------- data
    def make_loader(self, dataset) -> DataLoader:
        if len(dataset) < self.config.batch_size:
            raise DataError(f"{type(dataset).__name__}: {len(dataset)} samples, fewer than the global batch "
                            f"{self.config.batch_size}")
        self.sampler = ResumableSampler(dataset, self.setup.world_size, self.setup.rank, shuffle=True,
                                        seed=self.config.seed, drop_last=True)
        # The loader's own generator: making an iterator draws its workers' base seed from it, never from the
        # global RNG that dropout and noise draw from (a resumed run rebuilds the iterator mid-epoch).
        self.loader_generator = torch.Generator()
        return DataLoader(dataset, batch_size=self.per_rank_batch, sampler=self.sampler,
                          num_workers=self.config.num_workers, collate_fn=collate_skipping, drop_last=True,
                          pin_memory=self.device.type == "cuda", generator=self.loader_generator)

    def _batches(self, dataset):
        """Yields ``(batch or None, unreadable samples in it)`` from the current data position, epoch after
        epoch. The caller counts a batch as consumed (``batch_in_epoch``) once all ranks agreed to use it."""
        loader = self.make_loader(dataset)
        while True:
            self.sampler.set_epoch(self.epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.epoch)
            self.sampler.start = self.batch_in_epoch * self.per_rank_batch
            self.loader_generator.manual_seed(self.config.seed * 1000 + self.setup.rank + 7919 * self.epoch)
            yield from loader
            self.epoch += 1
            self.batch_in_epoch = 0

    def split(self, batch):
        """A per-rank batch -> ``grad_accum`` micro-batches (tensors, or tuples/lists of them)."""
        size = self.micro_batch
        count = len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
        chunks = []
        for start in range(0, count, size):
            if isinstance(batch, (tuple, list)):
                chunks.append(type(batch)(part[start:start + size] for part in batch))
            else:
                chunks.append(batch[start:start + size])
        return chunks

    # -------------------------------------------------------------------- checkpoints
    def checkpoint_path(self, step: int | None = None) -> str:
        folder = run_checkpoints.checkpoint_folder(self.config.out_dir)
        return os.path.join(folder, run_checkpoints.LAST) if step is None else run_checkpoints.step_file(folder, step)

    def _rank_state(self) -> dict[str, Any]:
        return {"rng": rng_state(), "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "skipped": self.skipped, "loaded": self.loaded, **self.per_rank_state()}

    def save_checkpoint(self) -> str | None:
        """Rank 0 writes ``checkpoints/step_NNNNNNN.pt`` (atomically) and makes ``checkpoints/last.pt`` a second
        name of it; with ``keep_last`` only the newest step files stay. A collective: every rank calls it."""
        path = None
        ranks = self.setup.gather(self._rank_state())  # collective: every rank
        if self.setup.is_main:
            folder = run_checkpoints.checkpoint_folder(self.config.out_dir)
            os.makedirs(folder, exist_ok=True)
            extra = {"trainer": self.name, "step": self.step, "epoch": self.epoch,
                     "batch_in_epoch": self.batch_in_epoch, "skipped": sum(rank["skipped"] for rank in ranks),
                     "ranks": ranks, "world_size": self.setup.world_size, **self.extra_state()}
            path = write_checkpoint(self.checkpoint_path(self.step), self.model_state(), self.metadata(), extra)
            publish_as(path, self.checkpoint_path())
            run_checkpoints.prune_step_files(folder, self.config.keep_last)
        self.saved_step, self.saved_here = self.step, True
        self.setup.barrier()
        return path

    def resume_from(self, path: str) -> str:
        """Restore everything :meth:`save_checkpoint` wrote from the newest checkpoint of ``path`` that loads
        (:func:`run_checkpoints.load_for_resume`), each rank taking its own RNG states, data position and skip
        count back. Exact continuation needs the same number of processes; with another number the run goes on
        from the same step and data position with freshly seeded per-rank RNGs (and a warning). Returns the
        file used."""
        state, path = run_checkpoints.load_for_resume(path)
        if state.get("trainer") != self.name:
            raise ValueError(f"--resume {path}: a {state.get('trainer')!r} checkpoint, not a {self.name!r} one")
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.saved_step = self.step
        self.load_extra_state(state)
        ranks = state["ranks"]
        if self.setup.world_size == state.get("world_size", 1):
            own = ranks[self.setup.rank]
            set_rng_state(own["rng"])
            self.load_per_rank_state(own)
            # files of older versions hold only rank 0's count
            self.skipped = own.get("skipped", state.get("skipped", 0) if self.setup.is_main else 0)
            self.loaded = own.get("loaded", 0)
        else:
            warnings.warn(f"--resume: the checkpoint was written by {state.get('world_size')} process(es), this run "
                          f"has {self.setup.world_size}: the data position is kept, the random streams restart",
                          RuntimeWarning, stacklevel=2)
            seed_everything(self.config.seed * 1000 + self.setup.rank + 7919 * self.step)
            self.skipped = state.get("skipped", 0) if self.setup.is_main else 0  # the run's total, counted once
            self.loaded = sum(rank.get("loaded", 0) for rank in ranks) if self.setup.is_main else 0
        return path

    # -------------------------------------------------------------------- run
    def run_and_close(self) -> dict[str, float]:
        """:meth:`run`, then release the process group, also after an error; returns the last logged row."""
        try:
            return self.run()
        finally:
            self.setup.close()

    def _prepare_out_dir(self) -> None:
        folder = run_checkpoints.checkpoint_folder(self.config.out_dir)
        if self.setup.is_main:
            os.makedirs(self.config.out_dir, exist_ok=True)
            for path in run_checkpoints.remove_stale_temporaries(folder):
                print(f"train {self.name}: removed {path}, left by an interrupted checkpoint write", file=sys.stderr)
        self.setup.barrier()
        if self.logger is None:
            self.logger = RunLogger(self.config.out_dir, self.setup.is_main, self.config.tensorboard)

    def _say(self, text: str) -> None:
        if self.setup.is_main:
            print(f"train {self.name}: {text}", file=sys.stderr, flush=True)

    def run(self) -> dict[str, float]:
        """Train to ``config.steps``; returns the last logged row. The run always ends with a checkpoint of
        its last step (whatever ``ckpt_every``), also when SIGTERM, Ctrl-C or the launcher's death stops it
        early (``stopped_by`` says which); a second Ctrl-C stops at once."""
        config = self.config
        if config.resume:
            used = self.resume_from(config.resume)
            if self.step >= config.steps:
                self._say(f"{used} is at step {self.step}, not below --steps {config.steps}: nothing to train "
                          "(raise --steps to continue)")
                return {}
        self._prepare_out_dir()
        self.choose_threads()
        with StopRequests() as stops:
            return self._loop(stops)

    def _loop(self, stops: StopRequests) -> dict[str, float]:
        config = self.config
        batches = self._batches(self.dataset)
        last: dict[str, float] = {}
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=config.steps, initial=self.step, desc=f"train {self.name}", unit="step",
                   disable=not (config.progress and self.setup.is_main), file=sys.stderr)
        window_start, window_steps = time.perf_counter(), 0
        skipped_in_a_row, warned_rate = 0, False
        try:
            while self.step < config.steps:
                stop = stops.poll()  # before fetching: a Ctrl-C also ends the loader's worker processes
                batch, skipped = (None, 0) if stop else next(batches)
                unreadable, stop = self.setup.any(batch is None and not stop, stop)
                if stop:
                    self.stopped_by = stops.reason or "another rank's stop"
                    break
                self.batch_in_epoch += 1
                self.skipped += skipped
                self.loaded += self.per_rank_batch
                if unreadable:  # every rank skips this step together: the data positions stay in step
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= self.sampler.num_samples // self.per_rank_batch:
                        raise DataError(f"{config.data}: no usable batch in a whole epoch ({skipped_in_a_row} "
                                        f"batches in a row had every sample unreadable on some process); "
                                        "see the warnings above for the files")
                    continue
                skipped_in_a_row = 0
                row = self.train_step(self.split(batch))
                self.step += 1
                window_steps += 1
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    row = {key: self.setup.mean(value) for key, value in row.items()}
                    elapsed = time.perf_counter() - window_start
                    row["steps_per_s"] = window_steps / elapsed if elapsed > 0 else 0.0
                    row["skipped"] = self.setup.total(self.skipped)
                    row["lr"] = self.current_lr()
                    warned_rate = self._warn_skip_rate(row["skipped"], self.setup.total(self.loaded), warned_rate)
                    self.logger.log(self.step, row)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "rec_loss", "flow")})
                    window_start, window_steps, last = time.perf_counter(), 0, row
                if config.eval_every and (self.step % config.eval_every == 0 or self.step == config.steps):
                    evaluation = self.evaluate()
                    if evaluation:
                        self.logger.log(self.step, evaluation, kind="eval")
                        last = {**last, **{f"eval_{k}": v for k, v in evaluation.items()}}
                if config.ckpt_every and self.step % config.ckpt_every == 0:
                    self.save_checkpoint()
            # the final checkpoint, whatever ckpt_every (also of a resumed state stopped before its first step,
            # when it was resumed from another folder: the printed --resume folder must hold it)
            if self.step > self.saved_step or (self.step > 0 and not self.saved_here):
                self.save_checkpoint()
        finally:
            bar.close()
            self.logger.close()
        if self.stopped_by is not None:
            saved = f"checkpoint {self.checkpoint_path()} (step {self.step})" if self.step else "no step done, no checkpoint"
            self._say(f"stopped by {self.stopped_by}; {saved}. Continue with the same command plus "
                      f"--resume {self.config.out_dir}")
        return last

    SKIP_WARNING_RATE = 0.1
    SMALL_MODEL_PARAMETERS = 20_000_000

    def choose_threads(self) -> int:
        """Set torch's intra-op threads for a CPU run: ``config.threads`` when given; else 1 for a model under
        ``SMALL_MODEL_PARAMETERS`` (its ops are too small to split, and on a busy machine every multi-threaded
        op waits for a descheduled sibling thread: a tiny config measured 10-17x slower with 2 threads on a
        loaded 2-core machine) and otherwise this machine's cores divided among its training processes. CUDA
        runs keep torch's setting. Returns the count in use."""
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        elif self.device.type == "cpu":
            parameters = sum(p.numel() for p in self.model.parameters())
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            threads = 1 if parameters < self.SMALL_MODEL_PARAMETERS else max(1, cores // local)
            torch.set_num_threads(threads)
            self._say(f"{torch.get_num_threads()} intra-op thread(s) per process for {parameters / 1e6:.1f}M "
                      "parameters (--threads N to change)")
        return torch.get_num_threads()

    def _warn_skip_rate(self, skipped: int, loaded: int, warned: bool) -> bool:
        """One loud warning (rank 0) once more than ``SKIP_WARNING_RATE`` of the samples loaded so far were
        unreadable; returns whether it has been given."""
        if warned or not loaded or skipped <= self.SKIP_WARNING_RATE * loaded:
            return warned
        if self.setup.is_main:
            warnings.warn(f"train {self.name}: {skipped} of {loaded} samples ({100 * skipped / loaded:.1f}%) were "
                          f"unreadable and skipped so far; check {self.config.data}", RuntimeWarning, stacklevel=2)
        return True

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if hasattr(self, "optimizer") else 0.0
