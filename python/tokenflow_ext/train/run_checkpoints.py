"""The checkpoint files of a training run: ``OUT/checkpoints/step_NNNNNNN.pt`` plus ``last.pt`` (a second name
of the newest one), and how a resume finds the newest one that loads.

Every file is written atomically (``models/_checkpoint.write_checkpoint``: temporary file, fsync, rename), so
a killed write leaves only a ``*.tmp-PID`` file behind; :func:`remove_stale_temporaries` deletes those of
processes that are gone. :func:`load_for_resume` verifies each candidate's stored CRC-32 checksums before
unpickling it and falls back, with a warning naming both files, to the newest step file that loads.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

from ..models._checkpoint import CheckpointError, _torch_load, _unreadable, check_file, verify_checksums

LAST = "last.pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_TEMPORARY = re.compile(r"\.tmp-(\d+)$")


def checkpoint_folder(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def step_file(folder: str, step: int) -> str:
    return os.path.join(folder, f"step_{step:07d}.pt")


def step_files(folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the step files in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(match.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (match := _STEP_FILE.match(name))]
    return sorted(found)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the ``*.tmp-PID`` files that killed writes left in ``folder`` (those whose process is gone);
    returns their paths."""
    if not os.path.isdir(folder):
        return []
    return _remove([os.path.join(folder, name) for name in os.listdir(folder)
                    if (match := _TEMPORARY.search(name)) and not _process_alive(int(match.group(1)))])


def prune_step_files(folder: str, keep_last: int) -> list[str]:
    """Keep the newest ``keep_last`` step files (0: keep all); returns the removed paths. ``last.pt`` is a
    name of its own and stays."""
    if keep_last <= 0:
        return []
    return _remove([path for _, path in step_files(folder)[:-keep_last]])


def _remove(paths: list[str]) -> list[str]:
    """Delete ``paths``; returns those this call removed (another process may have been first)."""
    removed = []
    for path in paths:
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _candidates(path: str) -> list[str]:
    """The files a ``--resume path`` may use, preferred first: the file given (or the folder's ``last.pt``),
    then the folder's step files, newest first."""
    if os.path.isdir(path):
        folder = checkpoint_folder(path) if os.path.isdir(checkpoint_folder(path)) else path
        last = os.path.join(folder, LAST)
        preferred = [last] if os.path.exists(last) else []
    else:
        check_file(path, "--resume checkpoint")
        folder, preferred = os.path.dirname(path) or ".", [path]
        if os.path.basename(path) != LAST:
            return preferred  # an explicit step file is used as given
    return preferred + [file for _, file in reversed(step_files(folder)) if file not in preferred]


def _read(path: str) -> dict[str, Any]:
    check_file(path, "--resume checkpoint")
    verify_checksums(path)
    try:
        state = _torch_load(path, "cpu")
    except MemoryError:
        raise
    except Exception as error:  # truncated zip, unpickling errors: see read_checkpoint
        raise _unreadable(path, error) from error
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint (no 'step' and 'model' entries); "
                              "--resume takes a run folder or a file its trainer wrote")
    return state


def load_for_resume(path: str) -> tuple[dict[str, Any], str]:
    """``(state, file)`` of the newest checkpoint that loads for ``--resume path`` (a run folder, its
    ``checkpoints`` folder, ``last.pt`` or a step file).

    A folder without ``last.pt`` (a kill during the first save) uses its newest step file; an unreadable or
    corrupt ``last.pt`` falls back to the newest step file that loads, with a warning naming both. An explicit
    step file is used as given. Raises :class:`CheckpointError` when nothing loads (each failure listed) and
    ``FileNotFoundError`` when there is no checkpoint at all."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume checkpoint not found: {path}")
    candidates = _candidates(path)
    if not candidates:
        raise FileNotFoundError(f"--resume {path}: no checkpoint in it (neither {LAST} nor step_*.pt)")
    failures: list[tuple[str, CheckpointError]] = []
    failed_files: set[tuple[int, int]] = set()
    for candidate in candidates:
        identity = (os.stat(candidate).st_dev, os.stat(candidate).st_ino)
        if identity in failed_files:  # last.pt is a hard link of a step file: the same bytes
            failures.append((candidate, failures[-1][1]))
            continue
        try:
            state = _read(candidate)
        except CheckpointError as error:
            failures.append((candidate, error))
            failed_files.add(identity)
            continue
        if failures:
            warnings.warn(f"--resume: {failures[0][0]} cannot be used ({failures[0][1]}); resuming from "
                          f"{candidate} (step {state['step']}) instead", RuntimeWarning, stacklevel=2)
        return state, candidate
    lines = "\n".join(f"  {file}: {error}" for file, error in failures)
    raise CheckpointError(f"--resume {path}: no checkpoint loads:\n{lines}")
