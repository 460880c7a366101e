"""Weights by Hugging Face Hub name: ``"ByteFlow-AI/TokenFlow"`` with ``filename=...``, or
``"ByteFlow-AI/TokenFlow/tokenflow_siglip_32k.pt"``, fetched through ``huggingface_hub`` (the optional ``[hub]``
extra) into its cache and read from there afterwards, also offline.

A local path always wins: a string that names an existing file or folder is used as it is. The environment
is read at each call (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_HOME``), so it may change after import.
:data:`OFFICIAL_FILES` lists the released files with the settings they load with, so
``TokenFlowTokenizer.from_pretrained("ByteFlow-AI/TokenFlow", filename="tokenflow_clipb_32k_enhanced.pt")``
needs no ``config=``.
"""

from __future__ import annotations

import os
import re
from typing import Any

# (repository, file) -> (model, the keyword arguments its from_pretrained needs for it)
OFFICIAL_FILES: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("ByteFlow-AI/TokenFlow", "tokenflow_clipb_32k_enhanced.pt"):
        ("TokenFlowTokenizer", {"config": "clipb_256", "enhanced_decoder": True}),
    ("ByteFlow-AI/TokenFlow", "tokenflow_siglip_32k.pt"): ("TokenFlowTokenizer", {"config": "siglip_384"}),
    ("turkeyju/FlowTok", "FlowTok-XL.pth"): ("FlowTok", {"preset": "XL"}),
    ("turkeyju/FlowTok", "FlowTok-H.pth"): ("FlowTok", {"preset": "H"}),
    ("turkeyju/FlowTok", "FlowTiTok_512.bin"): ("FlowTiTok", {}),
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(FileNotFoundError):
    """A Hub file cannot be had: not cached while offline, no such repository or file, or no network. The
    message names the repository, the file and the cache folder."""


def cache_folder(cache_dir: str | os.PathLike | None = None) -> str:
    """The Hub cache in use: ``cache_dir``, else ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).strip().lower() in (
        "1", "true", "yes", "on")


def split_id(name: str, filename: str | None = None) -> tuple[str, str | None] | None:
    """``(repo_id, filename)`` when ``name`` reads as a Hub id (``org/repo`` or ``org/repo/path/in/repo``) and
    is no local path; ``None`` otherwise."""
    if os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name:
        return None
    parts = name.split("/")
    if len(parts) < 2:
        return None
    repo = "/".join(parts[:2])
    if not _REPO_ID.match(repo):
        return None
    inner = "/".join(parts[2:]) or None
    if inner and filename and inner != filename:
        raise ValueError(f"{name!r} names the file {inner!r} but filename={filename!r} was given too")
    return repo, inner or filename


def official_settings(repo: str, filename: str | None) -> tuple[str, dict[str, Any]] | None:
    return OFFICIAL_FILES.get((repo, filename or ""))


def resolve_file(name: str | os.PathLike, filename: str | None = None, *, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None) -> str:
    """A local file path for ``name``: ``name`` itself when it exists (or reads as no Hub id), else the Hub
    file ``filename`` of the repository ``name`` (or the file in ``org/repo/file``) from the cache, downloaded
    first unless offline (``local_files_only`` or ``HF_HUB_OFFLINE=1``)."""
    name = os.fspath(name)
    hub = split_id(name, filename)
    if hub is None:
        if filename is not None and os.path.isdir(name):
            return os.path.join(name, filename)
        return name
    repo, inner = hub
    if inner is None:
        known = sorted(file for (r, file) in OFFICIAL_FILES if r == repo)
        raise ValueError(f"{name!r} is a Hub repository: say which file with filename= (or {name}/FILE)"
                         + (f"; its known files: {', '.join(known)}" if known else ""))
    return _download(repo, inner, revision, cache_dir, local_files_only)


def resolve_folder(name: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool | None = None, allow_patterns: list[str] | None = None) -> str:
    """A local folder for ``name``: ``name`` itself when it exists, else the snapshot of the Hub repository
    ``name`` (only ``allow_patterns`` files, e.g. ``["*.json", "*.safetensors", "*.model"]``)."""
    name = os.fspath(name)
    hub = split_id(name)
    if hub is None:
        return name
    repo, inner = hub
    if inner is not None:
        raise ValueError(f"{name!r}: a model folder is a whole repository ('org/repo'), not a file in it")
    hf = _hub()
    folder = cache_folder(cache_dir)
    only_local = offline() if local_files_only is None else local_files_only
    try:
        return hf.snapshot_download(repo, revision=revision, cache_dir=folder, local_files_only=only_local,
                                    allow_patterns=allow_patterns)
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types
        raise _hub_error(repo, "(the whole repository)", revision, folder, only_local, error) from error


def _hub():
    try:
        import huggingface_hub  # noqa: PLC0415
    except ImportError as error:
        raise ImportError("loading by Hub name needs huggingface_hub: pip install \"tokenflow_ext[hub]\" "
                          "(or pip install huggingface_hub); or pass a local path") from error
    return huggingface_hub


def _download(repo: str, filename: str, revision, cache_dir, local_files_only) -> str:
    hf = _hub()
    folder = cache_folder(cache_dir)
    only_local = offline() if local_files_only is None else local_files_only
    try:
        return hf.hf_hub_download(repo, filename, revision=revision, cache_dir=folder, local_files_only=only_local)
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types
        raise _hub_error(repo, filename, revision, folder, only_local, error) from error


def _hub_error(repo, filename, revision, folder, only_local, error) -> HubError:
    where = f"{repo} file {filename}" + (f" at revision {revision}" if revision else "")
    if only_local:
        return HubError(f"{where} is not in the Hub cache {folder} and downloads are off (HF_HUB_OFFLINE=1 or "
                        "local_files_only=True): download it once with network access, point HF_HUB_CACHE / "
                        f"cache_dir at a cache that has it, or pass a local path ({type(error).__name__})")
    return HubError(f"{where} could not be fetched into {folder}: {type(error).__name__}: {error}")
