"""Build the CPU emulation of ``csrc/cuda/*.cu``: the unchanged CUDA entry points and kernels compiled as C++
by g++ against ``include/tfx_cuda_emu.h`` and registered as ``torch.ops.<namespace>.*`` for CPU tensors.

Every ``.cu`` is rewritten by ``cu2emu.py`` (``k<<<g, b, s, st>>>(args)`` -> ``::emu::launch(...)``, line numbers
kept), compiled with ``-Dtokenflow_ext=<namespace>`` (default ``tokenflow_ext_emu``) beside the op schemas, and
linked into one shared library. Builds are cached under ``build/cuda_emu/`` by a hash of every input (sources,
emulation headers, flags, torch version), so a test run builds once and later runs reuse it.

Command line (from the repository root, with the project's virtualenv active)::

    python tests/cuda_emu/emu_build.py [--sanitize address|thread]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EMU_DIR = Path(__file__).resolve().parent
ROOT = EMU_DIR.parents[1]
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "cuda_emu"
SANITIZER_FLAGS = {
    None: ["-O2", "-g1"],
    "address": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
}
# The sanitizer runtime the Python process must preload (LD_PRELOAD) to load an instrumented library.
SANITIZER_RUNTIME = {"address": "libasan.so", "thread": "libtsan.so"}


class EmuBuildError(RuntimeError):
    pass


def default_cu_files() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


def default_schema_files() -> list[Path]:
    """The ``csrc/*.cpp`` files that define op schemas (not the pybind11 build-info module)."""
    return sorted(p for p in CSRC.glob("*.cpp") if "TORCH_LIBRARY_FRAGMENT" in p.read_text())


def sanitizer_runtime(sanitizer: str) -> str:
    """Absolute path of g++'s runtime for ``sanitizer`` (what LD_PRELOAD must name)."""
    name = SANITIZER_RUNTIME[sanitizer]
    return subprocess.run(["g++", f"-print-file-name={name}"], check=True, capture_output=True, text=True).stdout.strip()


def _torch_paths() -> tuple[str, str, int]:
    import torch  # noqa: PLC0415

    base = os.path.dirname(torch.__file__)
    return base, torch.__version__, int(torch.compiled_with_cxx11_abi())


def _digest(files: list[Path], extra: list[str]) -> str:
    h = hashlib.sha256()
    inputs = sorted(set(files) | set(CSRC.rglob("*.h")) | set(CSRC.rglob("*.cuh")) | set(EMU_DIR.rglob("*.h")))
    for path in inputs + [EMU_DIR / "cu2emu.py", Path(__file__)]:
        h.update(str(path).encode())
        h.update(path.read_bytes())
    h.update("\0".join(extra).encode())
    return h.hexdigest()[:16]


def build_env() -> dict[str, str]:
    # A sanitizer runtime preloaded into this Python must not leak into g++.
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=build_env())
    if result.returncode != 0:
        raise EmuBuildError(f"cuda-emu build step failed:\n{' '.join(cmd)}\n{result.stdout}{result.stderr}")


def build(sanitizer: str | None = None, *, namespace: str = "tokenflow_ext_emu", cu_files: list[Path] | None = None,
          schema_files: list[Path] | None = None, name: str | None = None, jobs: int | None = None) -> Path:
    """Build (or reuse) the emulation library and return its path.

    ``cu_files`` default to every ``csrc/cuda/*.cu``; ``schema_files`` to every ``csrc/*.cpp`` schema file.
    The object files compile in parallel (``jobs``, default: the CPU count).
    """
    if shutil.which("g++") is None:
        raise EmuBuildError("cuda-emu needs g++ on PATH")
    if sanitizer not in SANITIZER_FLAGS:
        raise EmuBuildError(f"sanitizer must be one of {sorted(k for k in SANITIZER_FLAGS if k)}, got {sanitizer!r}")
    cu_files = [Path(p) for p in (cu_files or default_cu_files())]
    schema_files = [Path(p) for p in (schema_files or default_schema_files())]
    torch_dir, torch_version, abi = _torch_paths()
    flags = ["-std=c++20", "-fPIC", "-pthread", "-Wno-unknown-pragmas", *SANITIZER_FLAGS[sanitizer],
             f"-I{EMU_DIR / 'include'}", f"-I{CSRC}", "-isystem", f"{torch_dir}/include",
             "-isystem", f"{torch_dir}/include/torch/csrc/api/include",
             f"-Dtokenflow_ext={namespace}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    label = name or f"{namespace}{'-' + sanitizer if sanitizer else ''}"
    key = _digest(cu_files + schema_files, flags + [torch_version, label])
    out_dir = CACHE / f"{label}-{key}"
    library = out_dir / f"lib{label}.so"
    if library.exists():
        return library
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=CACHE))
    try:
        units = []
        for cu in cu_files:
            generated = work / f"{cu.stem}.emu.cpp"
            _run([sys.executable, str(EMU_DIR / "cu2emu.py"), str(cu), str(generated)])
            units.append(generated)
        units += schema_files
        objects = [work / f"{i}_{unit.stem}.o" for i, unit in enumerate(units)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            list(pool.map(lambda pair: _run(["g++", *flags, "-c", str(pair[0]), "-o", str(pair[1])]),
                          zip(units, objects)))
        staged = work / library.name
        _run(["g++", "-shared", "-pthread", *SANITIZER_FLAGS[sanitizer], *map(str, objects), f"-L{torch_dir}/lib",
              f"-Wl,-rpath,{torch_dir}/lib", "-lc10", "-ltorch_cpu", "-o", str(staged)])
        out_dir.mkdir(exist_ok=True)
        os.replace(staged, library)  # atomic: a concurrent run sees the whole library or none
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return library


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sanitize", choices=["address", "thread"], default=None)
    args = parser.parse_args(argv)
    print(build(args.sanitize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
