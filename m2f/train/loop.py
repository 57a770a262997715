"""The training loop: data, AMP, DDP, checkpoints and exact resume, logs.

A run directory holds::

    RUN_DIR/checkpoint.json  latest state: iteration, model config, training options, scheduler, grad scaler,
                             RNG states of every rank, and the name of its tensor file (see m2f.train.state)
    RUN_DIR/checkpoint-*.safetensors  that state's model weights and optimizer tensors
    RUN_DIR/log.jsonl        one JSON object per logged iteration (losses, lr, grad norm, timings)
    RUN_DIR/log.csv          the same rows as CSV
    RUN_DIR/loss.png         loss curves
    RUN_DIR/model/           final weights in m2f's format (m2f_config.json + model.safetensors)

Resuming restores that state and continues the data order where it stopped (the sample
order and each sample's augmentation are pure functions of (seed, epoch, index)), so N iterations straight and
N/2 + resume + N/2 end in the same state. Several processes (``torchrun --nproc_per_node G m2f train ...``) train
with DistributedDataParallel: the process group comes from the torchrun environment (WORLD_SIZE > 1); each
rank reads its DistributedSampler share of every batch; only rank 0 writes.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import time
import typing
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from m2f.config import Mask2FormerConfig
from m2f.data.datasets import SegmentationDataset
from m2f.data.transforms import ScaleJitterCrop, collate, sample_generator
from m2f.errors import CheckpointError, InputError, M2FError
from m2f.io import atomic_path, write_text_atomic
from m2f.runtime import progress_bar

from .criterion import LossConfig, SetCriterion, _predictions
from .optim import OptimConfig, build_optimizer, build_scheduler, clip_full_model
from .state import (MANIFEST, TrainState, encoded_rng_state, has_state, is_state_file, load_state,
                    save_state, set_encoded_rng_state)

LOG_COLUMNS = ("iter", "epoch", "lr", "loss", "loss_ce", "loss_mask", "loss_dice", "grad_norm", "iter_time",
               "data_time")


@dataclass(frozen=True)
class TrainOptions:
    iters: int = 1000
    batch_size: int = 16  # total over all ranks (detectron2's IMS_PER_BATCH)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    input_size: tuple[int, int] | None = None  # crop size; None: the first image's size rounded up to 32
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip: bool = True
    amp: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 0
    backend: str = "torch"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainOptions":
        """The inverse of :meth:`to_dict`; a missing, unknown or mistyped field raises ValueError naming it."""
        return _typed_from_dict(cls, data, "")


def _typed_from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'options'} is a {type(data).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data))
    if unknown or missing:
        raise ValueError(f"{where or 'options'} has unknown field(s) {unknown} / lacks {missing}")
    return cls(**{name: _typed_value(data[name], hints[name], where + name) for name in names})


def _typed_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from JSON) as type ``hint``: int, float, bool, str, tuple[...], X | None or a dataclass."""
    if dataclasses.is_dataclass(hint):
        return _typed_from_dict(hint, value, where + ".")
    args = typing.get_args(hint)
    if type(None) in args:
        return None if value is None else _typed_value(value, next(a for a in args if a is not type(None)), where)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or len(value) != len(args):
            raise ValueError(f"{where} is {value!r}, expected a list of {len(args)}")
        return tuple(_typed_value(v, a, where) for v, a in zip(value, args))
    if hint in (bool, str):
        fits = isinstance(value, hint)
    else:  # int or float; JSON booleans are not numbers here
        fits = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if not fits:
        raise ValueError(f"{where} is {value!r}, expected {hint.__name__}")
    return float(value) if hint is float else value


# ---------------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env_from(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun's WORLD_SIZE / RANK / LOCAL_RANK; a single process when WORLD_SIZE is unset or 1."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("WORLD_SIZE / RANK / LOCAL_RANK must be integers (launch with torchrun)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InputError(f"inconsistent torchrun environment: WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local}")
    if world > 1 and ("MASTER_ADDR" not in environ or "MASTER_PORT" not in environ):
        raise InputError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set; launch with torchrun")
    return DistEnv(world, rank, local)


def resolve_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda but no CUDA GPU is available; use --device cpu")
        return torch.device("cuda", env.local_rank if env.world_size > 1 else torch.device(name).index or 0)
    if name != "cpu":
        raise InputError(f"unknown device {name!r}; use cpu, cuda or auto")
    return torch.device("cpu")


def init_distributed(env: DistEnv, device: torch.device) -> None:
    if env.world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                world_size=env.world_size, rank=env.rank)


# ---------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------


class _Samples(torch.utils.data.Dataset):
    """Items are (index, epoch) keys -> augmented (image, masks, labels)."""

    def __init__(self, dataset: SegmentationDataset, transform: ScaleJitterCrop, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        return self.transform(self.dataset[index], sample_generator(self.seed, epoch, index))


def epoch_batches(num_items: int, per_rank_batch: int, env: DistEnv, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of one epoch: DistributedSampler's shuffled share, full batches only.

    Iteration i's batches over all ranks are the shuffled items [i·B, (i+1)·B) (B the total batch) whatever the
    number of processes: the shuffle depends on (seed, epoch) only, and drop_last keeps the sampler from padding
    the epoch with repeated items."""
    sampler = torch.utils.data.DistributedSampler(range(num_items), num_replicas=env.world_size, rank=env.rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + per_rank_batch] for i in range(0, len(indices) - per_rank_batch + 1, per_rank_batch)]


def batch_stream(samples: _Samples, per_rank_batch: int, env: DistEnv, seed: int, start_iter: int,
                 collate_fn: Callable, num_workers: int) -> Iterator[tuple[int, list[int], Any]]:
    """(epoch, item indices, batch) from global iteration ``start_iter`` on, forever."""
    per_epoch = len(epoch_batches(len(samples), per_rank_batch, env, seed, 0))
    epoch, offset = divmod(start_iter, per_epoch)
    while True:
        batch_indices = epoch_batches(len(samples), per_rank_batch, env, seed, epoch)[offset:]
        keys = [[(i, epoch) for i in b] for b in batch_indices]
        # its own generator: creating a loader must not draw from the global RNG (resume would diverge)
        generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
        loader = torch.utils.data.DataLoader(samples, batch_sampler=keys, collate_fn=collate_fn,
                                             num_workers=num_workers, generator=generator)
        for indices, batch in zip(batch_indices, loader):
            yield epoch, indices, batch
        epoch, offset = epoch + 1, 0


_POINT_STREAM = 1 << 40  # added to a sample's index: far above any dataset's size, so never an augmentation key


def point_generators(seed: int, epoch: int, indices: list[int]) -> list[torch.Generator]:
    """The loss's random points of each sample (matching and point losses): like its augmentation, a pure
    function of (seed, epoch, index), another stream; so the loss does not depend on the number of processes."""
    return [sample_generator(seed, epoch, index + _POINT_STREAM) for index in indices]


# ---------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------------


class RunLog:
    """log.jsonl + log.csv + loss.png in the run directory (rank 0 only)."""

    def __init__(self, run_dir: Path, start_iter: int):
        self.jsonl, self.csv, self.png = run_dir / "log.jsonl", run_dir / "log.csv", run_dir / "loss.png"
        self.rows: list[dict] = []
        if start_iter > 0 and self.jsonl.exists():  # keep what the checkpoint covers, drop the rest
            for number, line in enumerate(self.jsonl.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    row = json.loads(line)
                    covered = row["iter"] <= start_iter
                except (ValueError, TypeError, KeyError):
                    raise CheckpointError(f"{self.jsonl} line {number} is not a log row; repair the line, or delete "
                                          "the file to resume with a log that starts here") from None
                if covered:
                    self.rows.append(row)
        write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.csv, buffer.getvalue())

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore").writerow(row)

    def plot(self) -> None:
        if not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        its = [r["iter"] for r in self.rows]
        fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice"):
            ax.plot(its, [r[key] for r in self.rows], label=key, linewidth=1.2 if key == "loss" else 0.8)
        ax.set_yscale("log")
        ax.set_ylabel("loss (total: all layers, weighted)")
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
        ax_lr.plot(its, [r["lr"] for r in self.rows], color="gray")
        ax_lr.set_ylabel("lr")
        ax_lr.set_xlabel("iteration")
        fig.tight_layout()
        with atomic_path(self.png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------


def _amp_context(enabled: bool, device: torch.device):
    if not enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _infer_input_size(dataset: SegmentationDataset, divisibility: int) -> tuple[int, int]:
    h, w = dataset[0].image.shape[:2]
    div = max(divisibility, 1)
    return math.ceil(h / div) * div, math.ceil(w / div) * div


def _run_dir_of(path: Path) -> Path:
    return path.parent if path.is_file() else path


def model_from_run(path: str | Path, backend: str = "torch", device: str = "cpu") -> torch.nn.Module:
    """The model of a run's training state (RUN_DIR, or one of its state files), in eval mode."""
    from m2f.checkpoints import load_state_dict_strict
    from m2f.model import build_model

    run_dir = _run_dir_of(Path(path))
    state = load_state(run_dir)
    model = build_model(_saved_config(state, run_dir), backend=backend)
    load_state_dict_strict(model, state.model, source=str(run_dir / MANIFEST),
                           fix="the run's state is damaged; evaluate its final weights in RUN_DIR/model if it has them")
    return model.to(device).eval()


def is_run_checkpoint(path: str | Path) -> bool:
    """A run's training state (checkpoint.json, its tensor file, a legacy checkpoint.pt), or a run folder that has
    one but no final model yet."""
    path = Path(path)
    if path.is_file():
        return is_state_file(path)
    return has_state(path) and not (path / "model.safetensors").is_file()


def _saved_config(state: TrainState, run_dir: Path) -> Mask2FormerConfig:
    try:
        return Mask2FormerConfig.from_dict(state.config)
    except M2FError as exc:
        raise CheckpointError(f"{run_dir / MANIFEST}: its model config is invalid ({exc}); restore the run folder "
                              "from a backup or start a new run with --force") from None


def _config_differences(given: Mask2FormerConfig, saved: Mask2FormerConfig) -> list[str]:
    def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(obj, dict):
            return {k: v for key, value in obj.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: obj}

    a, b = flat(given.to_dict()), flat(saved.to_dict())
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, where: Path, damaged: str) -> None:
    """torch's load_state_dict checks the group sizes only: the state of another model with as many parameters
    would load and then fail, or train wrongly. Groups must carry this model's parameter names and shapes."""
    groups, live = saved["param_groups"], optimizer.param_groups
    names = [g.get("name") if isinstance(g, dict) else None for g in groups]
    if names != [g["name"] for g in live]:
        raise CheckpointError(f"{where}: the optimizer state is of other parameters than this model's "
                              f"({len(groups)} groups vs {len(live)}); {damaged}")
    params: dict[int, tuple[str, torch.Tensor]] = {}
    for group, live_group in zip(groups, live):
        indices = group.get("params")
        if (not isinstance(indices, list) or len(indices) != len(live_group["params"])
                or not all(isinstance(i, int) for i in indices)):
            raise CheckpointError(f"{where}: optimizer group {group['name']} has params {indices!r}; {damaged}")
        params.update({index: (group["name"], p) for index, p in zip(indices, live_group["params"])})
    for index, values in saved["state"].items():
        if index not in params:
            raise CheckpointError(f"{where}: optimizer state for parameter {index}, which no group lists; {damaged}")
        name, param = params[index]
        for key, tensor in values.items():
            if tensor.ndim and tensor.shape != param.shape:
                raise CheckpointError(f"{where}: optimizer {key} of {name} is {tuple(tensor.shape)}, the parameter "
                                      f"{tuple(param.shape)}; {damaged}")


def _with_live_tuples(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """JSON stores tuples (AdamW's betas) as lists: give them back the live groups' types."""
    groups = [{k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v for k, v in g.items()}
              for g, live in zip(saved["param_groups"], optimizer.param_groups)]
    return {"state": saved["state"], "param_groups": groups}


class Trainer:
    def __init__(self, config: Mask2FormerConfig | None, dataset: SegmentationDataset, run_dir: str | Path,
                 options: TrainOptions, device: str = "auto", resume: bool = False,
                 init_state: dict[str, torch.Tensor] | None = None, progress: bool = True,
                 env: DistEnv | None = None, resume_iters: int | None = None,
                 model_factory: Callable[[Mask2FormerConfig, str], torch.nn.Module] | None = None):
        """On ``resume`` the model config and options come from RUN_DIR's training state (``options`` is ignored;
        ``config``, when given, must equal the saved one); ``resume_iters`` then sets a new total number of
        iterations."""
        self.env = env or dist_env_from()
        self.device = resolve_device(device, self.env)
        self.run_dir = Path(run_dir)
        self.state = load_state(self.run_dir) if resume else None
        if self.state is not None:
            saved_config = _saved_config(self.state, self.run_dir)
            differences = _config_differences(config, saved_config) if config is not None else []
            if differences:
                raise CheckpointError(
                    f"the run in {self.run_dir} is a model of another shape than --config ({len(differences)} "
                    f"field(s) differ: {'; '.join(differences[:3])}); resume without --config, or start a new run "
                    "in another --out")
            config = saved_config
            try:
                saved = TrainOptions.from_dict(self.state.options)
            except ValueError as exc:
                raise CheckpointError(f"{self.run_dir / MANIFEST}: bad training options ({exc}); restore the run "
                                      "folder from a backup or start a new run with --force") from None
            options = replace(saved, iters=resume_iters or saved.iters)
            if options.iters < self.state.iteration:
                raise InputError(f"--iters {options.iters} is below the checkpoint's iteration "
                                 f"{self.state.iteration}; pass a larger --iters")
        if config is None:
            raise InputError("a new run needs a model config (--config: a preset name or a JSON config file)")
        self.config, self.options, self.dataset, self.progress = config, options, dataset, progress
        if self.env.world_size > 1 and self.device.type != "cuda" and getattr(config.backbone, "norm", "") == "bn":
            raise InputError(f"the backbone's norm 'bn' (BatchNorm) would normalise each of the {self.env.world_size} "
                             "CPU processes' share of the batch alone (SyncBatchNorm needs GPUs); set the backbone "
                             "norm to 'frozen_bn' in --config, or train in one process")
        if options.batch_size % self.env.world_size:
            raise InputError(f"--batch-size {options.batch_size} does not split over {self.env.world_size} processes")
        self.per_rank_batch = options.batch_size // self.env.world_size
        if len(epoch_batches(len(dataset), self.per_rank_batch, self.env, options.seed, 0)) == 0:
            raise InputError(f"the dataset has {len(dataset)} images, fewer than one batch of {self.per_rank_batch} "
                             "per process; lower --batch-size")
        if dataset.num_classes != config.num_classes:
            raise InputError(f"the dataset has {dataset.num_classes} classes but the model config {config.num_classes}")
        if options.input_size is None:
            self.options = options = replace(options, input_size=_infer_input_size(dataset, config.size_divisibility))
        self.init_state = init_state
        self.model_factory = model_factory

    # -- construction --------------------------------------------------------------------------------
    def _build(self):
        if self.model_factory is None:
            from m2f.model import build_model as factory
        else:
            factory = self.model_factory
        torch.manual_seed(self.options.seed)  # same initial weights on every rank
        model = factory(self.config, backend=self.options.backend)
        if self.init_state is not None:
            model.load_state_dict(self.init_state)
        model.to(self.device).train()
        seed_everything(self.options.seed + self.env.rank)
        criterion = SetCriterion(self.config.num_classes, self.options.loss).to(self.device)
        optimizer = build_optimizer(model, self.options.optim)
        scheduler = build_scheduler(optimizer, self.options.iters, self.options.optim)
        use_scaler = self.options.amp and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if use_scaler else None
        return model, criterion, optimizer, scheduler, scaler

    # -- checkpoint ----------------------------------------------------------------------------------
    def _gather_rng(self) -> list[dict]:
        state = encoded_rng_state()
        if self.env.world_size == 1:
            return [state]
        states: list = [None] * self.env.world_size
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint(self, iteration: int, model, optimizer, scheduler, scaler) -> None:
        rng_states = self._gather_rng()  # every rank takes part
        if not self.env.is_main:
            return
        save_state(self.run_dir, TrainState(
            iteration=iteration, world_size=self.env.world_size, config=self.config.to_dict(),
            options=self.options.to_dict(), model=_unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
            rng=rng_states))

    def _restore(self, model, optimizer, scheduler, scaler) -> int:
        """Load the saved state into the freshly built objects; any mismatch is a CheckpointError raised before
        the run folder is touched."""
        from m2f.checkpoints import load_state_dict_strict

        state = self.state
        if state is None:
            return 0
        where = self.run_dir / MANIFEST
        damaged = "restore the run folder from a backup or start a new run with --force"
        load_state_dict_strict(model, state.model, source=str(where), fix=damaged)
        _check_optimizer_state(optimizer, state.optimizer, where, damaged)
        try:
            optimizer.load_state_dict(_with_live_tuples(state.optimizer, optimizer))
            scheduler.load_state_dict(state.scheduler)
            if scaler is not None and state.scaler:
                scaler.load_state_dict(state.scaler)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: the optimizer / scheduler / scaler state does not fit this run "
                                  f"({type(exc).__name__}: {exc}); {damaged}") from None
        for fn in scheduler.lr_lambdas:  # a raised --iters extends the poly schedule
            fn.max_iters = self.options.iters
        if state.world_size == self.env.world_size:
            set_encoded_rng_state(state.rng[self.env.rank])
        else:  # another number of processes: the RNG streams cannot continue; reseed deterministically
            seed_everything(self.options.seed + 1000003 * state.iteration + self.env.rank)
        return state.iteration

    # -- loop ----------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> Path | None:
        """Train to ``options.iters``; returns the final model folder (RUN_DIR/model).

        ``stop_after``: stop (with a checkpoint) once this iteration is done, as an interrupted run would; returns
        None then. Resuming continues exactly as if the run had not stopped."""
        opts, env, device = self.options, self.env, self.device
        init_distributed(env, device)
        model, criterion, optimizer, scheduler, scaler = self._build()
        start = self._restore(model, optimizer, scheduler, scaler)
        if env.world_size > 1:
            if device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        log = RunLog(self.run_dir, start) if env.is_main else None
        if env.is_main:
            write_text_atomic(self.run_dir / "train_config.json", json.dumps(
                {"config": self.config.to_dict(), "options": opts.to_dict(), "world_size": env.world_size,
                 "dataset": str(getattr(self.dataset, "root", "")), "device": str(device)}, indent=2) + "\n")

        transform = ScaleJitterCrop(opts.input_size, opts.scale_range, opts.hflip)
        samples = _Samples(self.dataset, transform, opts.seed)
        collate_fn = partial(collate, pixel_mean=self.config.pixel_mean, pixel_std=self.config.pixel_std,
                             size_divisibility=self.config.size_divisibility)
        stream = batch_stream(samples, self.per_rank_batch, env, opts.seed, start, collate_fn, opts.num_workers)
        params = [p for p in model.parameters() if p.requires_grad]
        saved = start if self.state is not None else None  # the iteration of the last checkpoint written
        with progress_bar(opts.iters, "train", unit="it", initial=start,
                          quiet=not (self.progress and env.is_main)) as bar:
            self._loop(start, stop_after, stream, model, criterion, optimizer, scheduler, scaler, params, log, bar,
                       saved)
        if stop_after is not None and stop_after < opts.iters:
            return None
        out = self.run_dir / "model"
        if env.is_main:
            save_model(_unwrap(model), out)
        if env.world_size > 1:
            dist.barrier()
        return out

    def _loop(self, start, stop_after, stream, model, criterion, optimizer, scheduler, scaler, params, log, bar,
              saved) -> None:
        opts, device = self.options, self.device
        previous_loss = None
        tick = time.perf_counter()
        for iteration in range(start, opts.iters):
            epoch, indices, (pixel_values, targets) = next(stream)
            data_time = time.perf_counter() - tick
            pixel_values = pixel_values.to(device, non_blocking=True)
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with _amp_context(opts.amp, device):
                outputs = model(pixel_values)
            # checked before the loss, whose matcher cannot work with NaN / inf
            if not self._all_finite([t for pair in _predictions(outputs) for t in pair]):
                raise self._diverged(iteration + 1, "the predictions are not finite", saved, previous_loss,
                                     iteration)
            losses = criterion(outputs, targets, point_generators(opts.seed, epoch, indices))
            loss = losses["loss"]
            if not self._all_finite([loss]):
                raise self._diverged(iteration + 1, f"the loss is {float(loss)}", saved, previous_loss, iteration)
            previous_loss = loss.detach()
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = clip_full_model(params, opts.optim.clip_norm)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                grad_norm = clip_full_model(params, opts.optim.clip_norm)
                if not self._all_finite([grad_norm]):  # with a scaler, its step skips such iterations instead
                    raise self._diverged(iteration + 1, f"the gradient norm is {float(grad_norm)}", saved, loss,
                                         iteration + 1)
                optimizer.step()
            scheduler.step()
            done = iteration + 1
            iter_time = time.perf_counter() - tick
            if done % opts.log_every == 0 or done == opts.iters:
                row = self._log_row(done, epoch, losses, optimizer, grad_norm, iter_time, data_time)
                if log is not None:
                    log.add(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            bar.update(1)
            stopping = stop_after is not None and done >= stop_after
            if done % opts.checkpoint_every == 0 or done == opts.iters or stopping:
                if not self._all_finite(params):  # never replace the last good checkpoint by a broken one
                    raise self._diverged(done, "the weights are no longer finite", saved, loss, done)
                self.save_checkpoint(done, model, optimizer, scheduler, scaler)
                saved = done
                if log is not None:
                    log.plot()
            if stopping:
                break
            tick = time.perf_counter()

    def _all_finite(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every value is finite, agreed over all ranks (so they all stop together)."""
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all().to(torch.int32)
        if self.env.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def _diverged(self, iteration: int, what: str, saved: int | None, loss: torch.Tensor | None,
                  loss_iteration: int) -> InputError:
        """The error that stops a diverged run; ``loss`` is that of ``loss_iteration`` (None: none yet)."""
        lr = self.options.optim.lr
        before = f" (loss {float(loss):.4g} at iteration {loss_iteration})" if loss is not None else ""
        kept = (f"the checkpoint of iteration {saved} in {self.run_dir} is kept" if saved is not None
                else "no checkpoint was written")
        return InputError(f"training diverged at iteration {iteration}: {what}{before}; {kept}. Train again with "
                          f"a lower --lr than {lr:g} (e.g. {lr / 10:g}) and --force")

    def _log_row(self, done, epoch, losses, optimizer, grad_norm, iter_time, data_time) -> dict:
        keys = ("loss", "loss_ce", "loss_mask", "loss_dice")
        values = torch.stack([losses[k].detach().float() for k in keys])
        if self.env.world_size > 1:
            dist.all_reduce(values)
            values /= self.env.world_size
        row = {"iter": done, "epoch": epoch, "lr": max(g["lr"] for g in optimizer.param_groups)}
        row.update({k: float(v) for k, v in zip(keys, values)})
        row.update({"grad_norm": float(grad_norm), "iter_time": round(iter_time, 4), "data_time": round(data_time, 4)})
        return row


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """Final weights in m2f's format: m2f_config.json + model.safetensors."""
    from m2f.checkpoints import save_pretrained

    save_pretrained(model, folder, force=True)  # atomic: the old folder is replaced only once the new one is whole


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
