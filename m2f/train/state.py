"""Training state on disk, in formats whose reading cannot run code (no pickle anywhere).

A run directory's state is two files::

    RUN_DIR/checkpoint.json                      the manifest: iteration, world size, model config, options,
                                                 scheduler, grad scaler, optimizer hyper-parameters, the RNG
                                                 states of every rank, and the name of the tensor file
    RUN_DIR/checkpoint-<iter>-<token>.safetensors  model weights (``model.*``) and optimizer tensors
                                                 (``optimizer.<param index>.<name>``)

A save writes its tensor file under a name no earlier save used, then replaces the manifest atomically, then
deletes the older tensor files: a reader always sees one whole state, and a crash keeps the previous one.
Runs of older m2f versions kept a pickled ``checkpoint.pt``; it is refused, never unpickled.
"""
from __future__ import annotations

import base64
import json
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2f.errors import CheckpointError
from m2f.io import atomic_path, read_json, write_json_atomic

MANIFEST = "checkpoint.json"
LEGACY_CHECKPOINT = "checkpoint.pt"
FORMAT = "m2f-train-state"
VERSION = 2
TENSORS_NAME = re.compile(r"checkpoint-\d{8}-[0-9a-f]{8}\.safetensors")
_DAMAGED = "restore the run folder from a backup or start a new run with --force"


@dataclass
class TrainState:
    iteration: int
    world_size: int
    config: dict
    options: dict
    model: dict[str, torch.Tensor]
    optimizer: dict  # torch's optimizer state_dict layout
    scheduler: dict
    scaler: dict | None
    rng: list[dict]  # one encoded_rng_state() per rank


def has_state(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds training state m2f would try to resume (including a refused legacy one)."""
    return (run_dir / MANIFEST).is_file() or (run_dir / LEGACY_CHECKPOINT).is_file()


def is_state_file(path: Path) -> bool:
    """A file of a run's training state: the manifest, its tensor file, or a legacy checkpoint.pt."""
    return path.name in (MANIFEST, LEGACY_CHECKPOINT) or bool(TENSORS_NAME.fullmatch(path.name))


def clear_state(run_dir: Path) -> None:
    """Remove a run's training state (``--force``): manifest first, so an interruption never leaves a manifest that
    names a deleted tensor file, and a later ``--resume`` cannot pick up the run that was replaced."""
    for name in (MANIFEST, LEGACY_CHECKPOINT):
        (run_dir / name).unlink(missing_ok=True)
    for old in run_dir.glob("checkpoint-*.safetensors"):
        if TENSORS_NAME.fullmatch(old.name):
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# RNG states as JSON
# ---------------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def encoded_rng_state() -> dict:
    """This process's torch / numpy / Python (and CUDA) RNG states, JSON-able."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()),
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _decode_rng(state: Any) -> tuple:
    """(torch state, numpy state, python state, cuda states) of one rank; checked on scratch generators, so a bad
    value fails here, before anything is restored."""
    torch_state = _unb64(state["torch"])
    torch.Generator().set_state(torch_state)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    numpy_state = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    np.random.RandomState().set_state(numpy_state)
    version, internal, gauss_next = state["python"]
    python_state = (version, tuple(internal), gauss_next)
    random.Random().setstate(python_state)
    return torch_state, numpy_state, python_state, [_unb64(s) for s in state.get("cuda", [])]


def set_encoded_rng_state(state: dict) -> None:
    torch_state, numpy_state, python_state, cuda_states = _decode_rng(state)
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------


def save_state(run_dir: Path, state: TrainState) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state.model.items()}
    for index, values in state.optimizer["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v.detach().cpu().contiguous() for k, v in values.items()})
    name = f"checkpoint-{state.iteration:08d}-{secrets.token_hex(4)}.safetensors"
    with atomic_path(run_dir / name) as tmp:
        tmp.write_bytes(save(tensors))  # through m2f.io: a full disk is one OutputError, not a SafetensorError
    manifest = {
        "format": FORMAT, "version": VERSION, "iteration": state.iteration, "world_size": state.world_size,
        "tensors": name, "config": state.config, "options": state.options,
        "optimizer_groups": state.optimizer["param_groups"], "scheduler": state.scheduler, "scaler": state.scaler,
        "rng": state.rng,
    }
    json.dumps(manifest, allow_nan=False)  # a non-finite or non-JSON value is a bug: fail before committing
    write_json_atomic(run_dir / MANIFEST, manifest)
    for old in run_dir.glob("checkpoint-*.safetensors"):
        if old.name != name and TENSORS_NAME.fullmatch(old.name):
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Load (every field checked: a damaged or foreign state is one CheckpointError, before anything is written)
# ---------------------------------------------------------------------------------------------------

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "iteration": int, "world_size": int, "tensors": str, "config": dict, "options": dict, "optimizer_groups": list,
    "scheduler": dict, "scaler": (dict, type(None)), "rng": list,
}


def load_state(run_dir: Path) -> TrainState:
    """The training state of ``run_dir``; CheckpointError (one line, with the fix) for anything else."""
    path = run_dir / MANIFEST
    if not path.is_file():
        if (run_dir / LEGACY_CHECKPOINT).is_file():
            raise CheckpointError(
                f"{run_dir / LEGACY_CHECKPOINT} is a pickled training checkpoint of an older m2f, which m2f no longer "
                "reads (unpickling can run arbitrary code); evaluate its final weights in RUN_DIR/model if the run "
                "finished, or start a new run with --force (optionally --init RUN_DIR/model)")
        raise CheckpointError(f"{run_dir} holds no training state ({MANIFEST}); start a new run without --resume")
    data = read_json(path, error=CheckpointError, fix=_DAMAGED)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not m2f training state (no \"format\": \"{FORMAT}\"); {_DAMAGED}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has version {data.get('version')!r}; this m2f reads {VERSION}: use the m2f "
                              "that wrote it, or start a new run with --force")
    for key, kind in _FIELDS.items():
        if key not in data:
            raise CheckpointError(f"{path} lacks \"{key}\"; {_DAMAGED}")
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: \"{key}\" is a {type(value).__name__}, expected "
                                  f"{getattr(kind, '__name__', 'object or null')}; {_DAMAGED}")
    if data["iteration"] < 0 or data["world_size"] < 1 or len(data["rng"]) != data["world_size"]:
        raise CheckpointError(f"{path}: iteration {data['iteration']}, world_size {data['world_size']} and "
                              f"{len(data['rng'])} RNG states do not fit together; {_DAMAGED}")
    for rank, rng in enumerate(data["rng"]):
        try:
            _decode_rng(rng)
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise CheckpointError(f"{path}: the RNG state of rank {rank} is malformed ({type(exc).__name__}: "
                                  f"{exc}); {_DAMAGED}") from None
    model, optimizer_state = _read_tensors(run_dir, data["tensors"], path)
    return TrainState(
        iteration=data["iteration"], world_size=data["world_size"], config=data["config"], options=data["options"],
        model=model, optimizer={"state": optimizer_state, "param_groups": data["optimizer_groups"]},
        scheduler=data["scheduler"], scaler=data["scaler"], rng=data["rng"],
    )


def _read_tensors(run_dir: Path, name: str, manifest: Path) -> tuple[dict, dict]:
    from m2f.checkpoints import read_safetensors

    if not TENSORS_NAME.fullmatch(name):  # a plain name in the run folder, never a path elsewhere
        raise CheckpointError(f"{manifest}: \"tensors\" is {name!r}, not a checkpoint-*.safetensors name; {_DAMAGED}")
    file = run_dir / name
    if not file.is_file():
        raise CheckpointError(f"{manifest} names {name}, which is missing; {_DAMAGED}")
    model: dict[str, torch.Tensor] = {}
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in read_safetensors(file).items():
        part, _, rest = key.partition(".")
        index, _, state_name = rest.partition(".")
        if part == "model" and rest:
            model[rest] = tensor
        elif part == "optimizer" and index.isdigit() and state_name:
            optimizer.setdefault(int(index), {})[state_name] = tensor
        else:
            raise CheckpointError(f"{file} holds tensor {key!r}, which is neither model.* nor optimizer.N.*; "
                                  f"{_DAMAGED}")
    return model, optimizer
