"""Reading, checking and writing model checkpoints (shared by the TokenFlow and FlowTok models).

Official files are dicts that hold the weights under ``"ema"``, ``"model"`` or ``"state_dict"`` (tried in
that order, as the official loaders do), or are a bare state dict. They are read with
``torch.load(weights_only=True)``; ``argparse.Namespace`` (the ``args`` entry of TokenFlow training
checkpoints) is allowed as a safe global. ``.safetensors`` files need the ``safetensors`` package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zipfile
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

WEIGHT_ENTRIES = ("ema", "model", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: the message names the file and the problem."""


class StateDictMismatchError(RuntimeError):
    """A checkpoint does not fit a model: lists the missing, unexpected and wrongly shaped keys."""

    def __init__(self, model_name: str, missing: list[str], unexpected: list[str],
                 wrong_shape: list[tuple[str, tuple, tuple]], limit: int = 20):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        lines = [f"{model_name}: the checkpoint does not match the model "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrongly shaped keys)"]
        for title, items in (("missing", missing), ("unexpected", unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                lines.append(f"  {title}: {shown}")
        for key, want, got in wrong_shape[:limit]:
            lines.append(f"  wrong shape: {key}: model {want}, checkpoint {got}")
        if len(wrong_shape) > limit:
            lines.append(f"  ... {len(wrong_shape) - limit} more wrongly shaped keys")
        super().__init__("\n".join(lines))


def _torch_load(path: str, map_location) -> Any:
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:  # torch < 2.5
        return torch.load(path, map_location=map_location, weights_only=True)
    with safe([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _unreadable(path: str, error: BaseException) -> CheckpointError:
    # torch's own text is long (an UnpicklingError's advice to pass weights_only=False, which would be wrong
    # here): its first line says what failed
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    detail = f"{type(error).__name__}: {first_line[:300]}".rstrip(": ")
    return CheckpointError(f"{path}: not a readable checkpoint (expected a torch.save file or .safetensors; "
                           f"reading it failed with {detail})")


def check_file(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """``path`` as a string, or an error naming it: missing, a directory, unreadable, empty."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} {path} is not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted download or copy?")
    return path


def verify_checksums(path: str | os.PathLike) -> str:
    """Check every record of a ``torch.save`` file against the CRC-32 its zip container stores for it
    (``torch.load`` does not: a flipped byte in a tensor loads silently). Raises :class:`CheckpointError` for a
    mismatch or a truncated file; files that are no zip archive (legacy pickles, safetensors) pass unchecked."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        return path
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise _unreadable(path, error) from error
    if corrupt is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: the record {corrupt!r} does not match its stored "
                              "CRC-32 checksum (a damaged disk, copy or download)")
    return path


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    entries: Iterable[str] = WEIGHT_ENTRIES) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` from a checkpoint file. ``metadata`` holds the ``"tokenflow_ext"``
    entry written by :func:`write_checkpoint` (empty for official files).

    A missing file, a directory, an empty file or one that is no checkpoint (text, truncated, another
    format) raises an error naming the file and the problem (:class:`CheckpointError` for the last two)."""
    path = check_file(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError as error:
            raise ImportError("reading .safetensors needs the safetensors package (pip install safetensors)") from error
        try:
            with safe_open(path, framework="pt", device=str(map_location)) as handle:
                state = {key: handle.get_tensor(key) for key in handle.keys()}
                metadata = handle.metadata() or {}
        except Exception as error:  # safetensors raises its own SafetensorError and OSErrors
            raise _unreadable(path, error) from error
        return state, metadata
    try:
        loaded = _torch_load(path, map_location)
    except MemoryError:
        raise
    except Exception as error:
        # pickle and torch raise anything for text, truncated or foreign files: "KeyError: 101", EOFError,
        # IndexError, UnpicklingError, zip RuntimeErrors...
        raise _unreadable(path, error) from error
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
    metadata = loaded.get("tokenflow_ext", {}) or {}
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{path}: its 'tokenflow_ext' metadata entry is a {type(metadata).__name__}, not a dict")
    metadata = dict(metadata)
    for entry in entries:
        if isinstance(loaded.get(entry), Mapping):
            loaded = loaded[entry]
            break
    state = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: no tensors found (looked for the entries {list(entries)} and a bare "
                              "state dict)")
    if all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state, metadata


def mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """``(missing, unexpected, wrong_shape)`` of ``state`` against ``model.state_dict()``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [(key, tuple(expected[key].shape), tuple(state[key].shape))
                   for key in sorted(set(expected) & set(state)) if expected[key].shape != state[key].shape]
    return missing, unexpected, wrong_shape


def cast_to_model_dtypes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each floating-point tensor cast to the dtype of the model's tensor of the same key
    (e.g. a codebook saved in fp16 loads as the model's fp32, instead of a half-precision parameter that
    the fused ops reject at first use). Integer and bool tensors are kept as they are."""
    expected = model.state_dict(keep_vars=True)
    cast = {}
    for key, value in state.items():
        target = expected.get(key)
        if (target is not None and value.is_floating_point() and target.is_floating_point()
                and value.dtype != target.dtype):
            value = value.to(target.dtype)
        cast[key] = value
    return cast


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True,
                 assign: bool = False) -> tuple[list[str], list[str]]:
    """``model.load_state_dict`` with a full mismatch report. Wrong shapes always raise; missing or
    unexpected keys raise when ``strict``. Floating-point tensors take the model's dtype
    (:func:`cast_to_model_dtypes`). Returns ``(missing, unexpected)``."""
    missing, unexpected, wrong_shape = mismatch(model, state)
    if wrong_shape or (strict and (missing or unexpected)):
        raise StateDictMismatchError(type(model).__name__, missing, unexpected, wrong_shape)
    model.load_state_dict(cast_to_model_dtypes(model, state), strict=strict, assign=assign)
    return missing, unexpected


def write_checkpoint(path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                     extra: Mapping[str, Any] | None = None) -> str:
    """Write ``state`` with ``metadata`` (JSON-able): safetensors for a ``.safetensors`` path, else a
    ``torch.save`` dict ``{"model": state, "tokenflow_ext": metadata}`` that :func:`read_checkpoint` and
    the official loaders (which look for ``"model"``) both read.

    ``extra`` entries (torch files only; e.g. a trainer's ``ema``, optimizer and RNG states) are stored
    beside ``"model"``. The file is written atomically: to a temporary file in the same folder, then
    renamed over ``path``, so an interrupted write leaves any previous file at ``path`` intact. The file and
    its folder are flushed to disk (fsync) before and after the rename: after a power cut the name points at
    the whole new file or at the old one."""
    path = os.fspath(path)
    if extra and path.endswith(".safetensors"):
        raise ValueError("write_checkpoint: extra entries need a torch file, not .safetensors")
    return write_atomically(path, lambda temporary: _write(temporary, path, state, metadata, extra))


def temporary_name(path: str) -> str:
    """Where :func:`write_atomically` writes before the rename: ``PATH.tmp-PID``."""
    return f"{path}.tmp-{os.getpid()}"


def write_atomically(path: str, write: Callable[[str], Any]) -> str:
    """``write(temporary)`` a file, flush it to disk, rename it over ``path`` and flush the folder: ``path`` is
    the old file or the whole new one, never a partial one; a failed write leaves no temporary behind."""
    temporary = temporary_name(path)
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(os.path.dirname(path) or ".")
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)
    return path


def publish_as(source: str, target: str) -> str:
    """Make ``target`` a second name of the finished file ``source`` (a hard link; a copy where the file system
    has none), atomically (:func:`write_atomically`)."""
    def link_or_copy(temporary: str) -> None:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)

    return write_atomically(target, link_or_copy)


def _fsync(path: str) -> None:
    """Flush a file's or a folder's data to disk (folders: the names in it; skipped where unsupported)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(descriptor)


def _write(target: str, path: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
           extra: Mapping[str, Any] | None) -> None:
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    text_metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError as error:
            raise ImportError("writing .safetensors needs the safetensors package (pip install safetensors)") from error
        save_file(tensors, target, metadata=text_metadata)
    else:
        torch.save({"model": tensors, "tokenflow_ext": text_metadata, **(extra or {})}, target)
