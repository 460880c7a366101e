"""``python -m tokenflow_ext verify-gpu``: the one command to run on a machine with a GPU.

It builds nothing. With tokenflow_ext installed from a work tree with ``TOKENFLOW_EXT_CUDA=ON``, it

1. runs the ``cuda``-marked tests of the repository's ``tests/`` folder (``pytest -m cuda``);
2. runs every CUDA parity case of :mod:`tokenflow_ext.testing.cuda_parity` (the shapes the emulated CUDA tests use
   in CI, plus the GPU-only sizes) on the real GPU against the CPU ops and the reference;
3. runs ``bench --device cuda`` (search, gather, quantize, flow step/loop/train, multiscale and the model cases)
   and writes ``benchmarks/results/<gpu-name>.{json,md,png}``, with the test and parity summary appended to
   the Markdown file.

Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import tokenflow_ext


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (the result files' name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tests", metavar="DIR", default="tests",
                        help="the repository's tests folder (default: ./tests); skipped with a note when absent")
    parser.add_argument("--out", metavar="DIR", default="benchmarks/results",
                        help="where the result files go (default: benchmarks/results)")
    parser.add_argument("--bench-mode", choices=["quick", "default", "full"], default="full",
                        help="the bench grid (default: full, which includes the whole-model cases)")
    parser.add_argument("--skip-bench", action="store_true", help="tests and parity cases only")


def _run_tests(tests: Path) -> tuple[bool, str]:
    if not tests.is_dir():
        return True, f"not run: no tests folder at {tests} (run from the repository root or pass --tests)"
    result = subprocess.run([sys.executable, "-m", "pytest", str(tests), "-m", "cuda", "-q", "-p", "no:cacheprovider"],
                            capture_output=True, text=True)
    sys.stdout.write(result.stdout[-20000:])
    sys.stderr.write(result.stderr[-5000:])
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    return result.returncode == 0, summary


def _run_parity() -> tuple[bool, list[tuple[str, str, float]]]:
    from .testing.cuda_parity import CASES, run_case  # noqa: PLC0415

    rows, ok = [], True
    for case in CASES:
        start = time.perf_counter()
        try:
            problems = run_case(case, "cuda", torch.ops.tokenflow_ext)
        except Exception as error:  # noqa: BLE001  (a crash is a failed case, reported, not a stop)
            problems = [f"{type(error).__name__}: {error}"]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        ok = ok and not problems
        rows.append((case.name, status, seconds))
        print(f"{'ok  ' if not problems else 'FAIL'} {case.name} ({seconds:.2f} s)"
              + ("" if not problems else "\n     " + "\n     ".join(problems)), flush=True)
    return ok, rows


def run(args) -> int:
    if not torch.cuda.is_available():
        print("verify-gpu: no CUDA GPU is visible to torch", file=sys.stderr)
        return 2
    if not tokenflow_ext.build_info()["with_cuda"]:
        print("verify-gpu: tokenflow_ext was built without its CUDA kernels; rebuild from the work tree with\n"
              "  TOKENFLOW_EXT_CUDA=ON TOKENFLOW_EXT_CUDA_ARCHS=90 pip install --no-build-isolation --no-deps .",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"verify-gpu: cannot create --out {out}: {error}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    stem = out / gpu_slug(name)
    print(f"verify-gpu on {name}: torch {torch.__version__}, tokenflow_ext {tokenflow_ext.__version__}", flush=True)

    print("== 1/3 cuda-marked tests", flush=True)
    tests_ok, tests_summary = _run_tests(Path(args.tests))
    print("== 2/3 CUDA parity cases (the emulated CI shapes and the GPU-only sizes)", flush=True)
    parity_ok, parity_rows = _run_parity()
    bench_ok = True
    if not args.skip_bench:
        print("== 3/3 bench --device cuda", flush=True)
        from .__main__ import main as cli  # noqa: PLC0415

        bench_args = ["bench", "--device", "cuda", "--markdown", f"{stem}.md", "--json", f"{stem}.json",
                      "--no-progress"]
        if args.bench_mode != "default":
            bench_args.append(f"--{args.bench_mode}")
        try:
            import matplotlib  # noqa: F401, PLC0415

            bench_args += ["--plot", f"{stem}.png"]
        except ImportError:
            print("verify-gpu: matplotlib is not installed, no speedup plot", flush=True)
        bench_ok = cli(bench_args) == 0

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## GPU verification ({name}, {date})\n",
             f"- `pytest -m cuda`: {'passed' if tests_ok else 'FAILED'} ({tests_summary})",
             f"- CUDA parity cases: {sum(status == 'ok' for _, status, _ in parity_rows)} of {len(parity_rows)} "
             f"passed\n", "| parity case | result | seconds |", "|---|---|---|"]
    lines += [f"| {case} | {status} | {seconds:.2f} |" for case, status, seconds in parity_rows]
    with open(f"{stem}.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"verify-gpu: results in {stem}.md" + ("" if args.skip_bench else f", {stem}.json"))
    ok = tests_ok and parity_ok and bench_ok
    print("verify-gpu: " + ("every step passed" if ok else "FAILED: " + ", ".join(
        step for step, passed in (("tests", tests_ok), ("parity", parity_ok), ("bench", bench_ok)) if not passed)))
    return 0 if ok else 1
