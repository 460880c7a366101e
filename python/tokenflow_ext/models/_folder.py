"""Model folders in the Hugging Face layout: ``config.json`` plus ``model.safetensors``, or, above a size
limit, ``model-00001-of-0000N.safetensors`` shards with the standard ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {key: shard}}``).

Writing is safe against interruption: every file goes to a temporary name and is renamed; the index (or the
single file) comes last, so a folder with an index always has all its shards.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from ._checkpoint import CheckpointError, _fsync, write_atomically

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3  # the Hugging Face default ("5GB")


def _safetensors():
    try:
        from safetensors.torch import load_file, save_file  # noqa: PLC0415
    except ImportError as error:
        raise ImportError("model folders use safetensors: pip install safetensors") from error
    return load_file, save_file


def write_json(path: str, value: Mapping[str, Any]) -> None:
    def write(target):
        with open(target, "w") as handle:
            json.dump(value, handle, indent=2, sort_keys=True)
            handle.write("\n")
    write_atomically(path, write)


def shard_plan(state: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most ``max_shard_bytes`` each (a larger tensor gets a shard of its own),
    in state-dict order."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_folder(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Mapping[str, str] | None = None) -> str:
    """Write ``config.json`` and the weights of ``state`` (contiguous CPU copies; tensors that share memory are
    written once each) into ``folder``; returns the folder."""
    load_file, save_file = _safetensors()
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    info = {"format": "pt", **(metadata or {})}
    plan = shard_plan(tensors, max_shard_bytes)
    for stale in (INDEX, SINGLE):  # a previous save of another layout: its index/file would mislead a reader
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    write_json(os.path.join(folder, CONFIG), config)
    if len(plan) == 1:
        write_atomically(os.path.join(folder, SINGLE), lambda target: save_file(tensors, target, metadata=info))
        return folder
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    for name, keys in zip(names, plan):
        part = {key: tensors[key] for key in keys}
        write_atomically(os.path.join(folder, name), lambda target, part=part: save_file(part, target, metadata=info))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(os.path.join(folder, INDEX), {"metadata": {"total_size": total},
                                             "weight_map": {key: name for name, keys in zip(names, plan)
                                                            for key in keys}})
    _fsync(folder)
    return folder


def is_model_folder(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in (INDEX, SINGLE))


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(os.fspath(folder), CONFIG)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None


def load_folder(folder: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state, config)`` of a folder written by :func:`save_folder` (or any folder in that layout). With an
    index, every shard it names must exist and hold its keys."""
    load_file, _ = _safetensors()
    folder = os.fspath(folder)
    config = read_config(folder)
    index_path = os.path.join(folder, INDEX)
    if os.path.exists(index_path):
        with open(index_path) as handle:
            weight_map = json.load(handle).get("weight_map", {})
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path} names the shard {name}, which is missing from {folder}")
            state.update(load_file(path, device=device))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index_path}: the shards lack {len(missing)} indexed tensors, e.g. {missing[:3]}")
        return state, config
    single = os.path.join(folder, SINGLE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder}: no {SINGLE} and no {INDEX}")
    return load_file(single, device=device), config
