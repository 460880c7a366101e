"""Command line: ``python -m tokenflow_ext bench`` (the main job), ``python -m tokenflow_ext tokenize IMAGE...
--checkpoint PATH`` (TokenFlow indices and reconstructions), ``python -m tokenflow_ext train {tokenizer,flowtok}``
(training, also under ``torchrun``), ``python -m tokenflow_ext eval {reconstruction,generation}`` (PSNR, SSIM,
LPIPS, rFID, codebook usage; FID and CLIP score), ``python -m tokenflow_ext generate PROMPT...`` (TokenFlow
text-to-image),
``python -m tokenflow_ext verify-gpu`` (on a GPU
machine: tests, CUDA parity cases and benchmarks in one command) and ``python -m tokenflow_ext info``.

Also installed as the ``tokenflow-ext`` console script.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import sys

import torch

import tokenflow_ext

PEERS = ["faiss", "flow_matching", "torchdiffeq", "matplotlib"]


def _families(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def bench(args) -> int:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .bench import cases as case_grid  # noqa: PLC0415
    from .bench import report  # noqa: PLC0415
    from .bench.timing import machine_description  # noqa: PLC0415

    problem = _output_problem(args)  # every argument error before the run, not after minutes of it
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.families) - set(case_grid.FAMILIES))
    if unknown:
        print(f"bench: unknown families {unknown}; choose from {case_grid.FAMILIES}", file=sys.stderr)
        return 2
    try:
        sizes = case_grid.parse_sizes(args.sizes) if args.sizes else None
    except ValueError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not (torch.cuda.is_available() and tokenflow_ext.build_info()["with_cuda"]):
        if args.device == "cuda":
            print("bench: --device cuda needs a visible GPU and tokenflow_ext built with CUDA kernels", file=sys.stderr)
            return 2
        devices.remove("cuda")
    planned = [(device, family, problem) for device in devices
               for family, problem in case_grid.cases_for(args.mode, args.families, sizes)]
    if not planned:
        print("bench: no case matches these --families and --sizes", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from .bench.timing import load_warning, machine_load  # noqa: PLC0415

    warning = load_warning(torch.get_num_threads()) if "cpu" in devices else None
    if warning:
        print(f"bench: warning: {warning}", file=sys.stderr)
    load_before = machine_load()
    rows, sized_rows = [], []
    progress = tqdm(planned, desc="bench", unit="case", disable=args.no_progress, file=sys.stderr)
    for device, family, problem in progress:
        progress.set_postfix_str(f"{device} {family} {case_grid.problem_label(problem)}")
        new_rows = case_grid.RUNNERS[family](problem, device, repeats=args.repeats)
        rows += new_rows
        sized_rows += [(row, case_grid.problem_size(problem)) for row in new_rows]
    machine = "; ".join(machine_description(device) for device in devices)
    load_after = machine_load()
    load = (None if load_before is None or load_after is None else
            f"load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end, "
            f"on {load_after[1]} CPU(s)")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m tokenflow_ext " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"machine: {machine}\n")
    print(report.text_table(rows))
    print(f"\n{report.legend(rows)}" + (f" ({load})" if load else ""))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(rows, machine, date, command, load))
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json(rows, machine, date, command, load))
    if args.plot:
        from .bench.plot import plot_speedups  # noqa: PLC0415

        plot_speedups(sized_rows, args.plot, f"tokenflow_ext speedups: {machine} ({date})")
    failed = [row for row in rows if not row.ok]
    for row in failed:
        print(f"CHECK FAILED: {row.family} {row.shape} vs {row.baseline}: {row.agreement}", file=sys.stderr)
    return 1 if failed else 0


def _output_problem(args) -> str | None:
    """Why the run could not finish (bad --repeats / --threads, an output folder that does not exist or is
    not writable, --plot without matplotlib), or None."""
    if args.repeats < 1:
        return f"--repeats must be at least 1, got {args.repeats}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be at least 1, got {args.threads}"
    for option in ("markdown", "json", "plot"):
        path = getattr(args, option)
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            return f"--{option} {path} is a directory; give a file name"
        if not os.path.isdir(folder):
            return f"--{option} {path}: the folder {folder} does not exist"
        if not os.access(folder, os.W_OK):
            return f"--{option} {path}: the folder {folder} is not writable"
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install matplotlib (or the plot extra: pip install \".[plot]\")"
    return None


def info(_args) -> int:
    build = tokenflow_ext.build_info()
    for key, value in build.items():
        print(f"{key}: {value}")
    print(f"gpu: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    for peer in PEERS:
        print(f"peer {peer}: {'installed' if importlib.util.find_spec(peer) else 'not installed'}")
    return 0


DESCRIPTION = ("tokenflow_ext: fused C++/CUDA kernels and models for the TokenFlow and FlowTok image tokenizers. "
               "Also installed as the tokenflow-ext console script; each command has its own --help.")


class StrictParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that takes no abbreviations (``--step`` is not ``--steps``); its subcommands are
    made of the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def main(argv=None) -> int:
    parser = StrictParser(prog="python -m tokenflow_ext", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="fused ops vs eager PyTorch, torch.compile and installed peers")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes (seconds)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the grid of benchmarks/results/cpu.md, with the whole-model cases (an hour or more on "
                           "2 CPU cores)")
    b.set_defaults(mode="default")
    b.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    b.add_argument("--sizes", metavar="LIST",
                   help="override the grid: comma-separated NxK (codebook families) and BxLxD (flow families)")
    from .bench.cases import FAMILIES  # noqa: PLC0415

    b.add_argument("--families", type=_families, default=list(FAMILIES),
                   help=f"comma-separated subset of {','.join(FAMILIES)} (multiscale, tokenizer, flowtok, "
                        "train: whole models, --full only; t2i: the sample_logits op, plus the t2i sampling loops with "
                        "--full; peers: vector-quantize-pytorch and faiss-cpu where installed)")
    b.add_argument("--repeats", type=int, default=5,
                   help="timed samples per implementation, interleaved with the baseline's (min, median and "
                        "p10-p90 reported)")
    b.add_argument("--threads", type=int, metavar="N",
                   help="torch intra-op threads (default: torch's); 1 avoids scheduler waits on a loaded machine")
    b.add_argument("--markdown", metavar="PATH", help="write the table as Markdown (benchmarks/results/ form)")
    b.add_argument("--json", metavar="PATH", help="write every row as JSON")
    b.add_argument("--plot", metavar="PATH", help="PNG of speedup against problem size (needs matplotlib)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=bench)
    t = sub.add_parser("tokenize", help="TokenFlow: images -> indices (.npy) and reconstructions (.png)")
    from .models.tokenflow import cli as tokenize_cli  # noqa: PLC0415

    tokenize_cli.add_arguments(t)
    t.set_defaults(func=tokenize_cli.run)
    v = sub.add_parser("verify-gpu", help="on a GPU machine: cuda tests, CUDA parity cases, bench --device cuda, "
                                          "results into benchmarks/results/<gpu>.{json,md,png}")
    from . import verify_gpu  # noqa: PLC0415

    verify_gpu.add_arguments(v)
    v.set_defaults(func=verify_gpu.run)
    tr = sub.add_parser("train", help="train a TokenFlow tokenizer or FlowTok (DDP under torchrun)")
    from .train import cli as train_cli  # noqa: PLC0415

    train_cli.add_arguments(tr)
    tr.set_defaults(func=train_cli.run)
    e = sub.add_parser("eval", help="score a tokenizer on a folder: PSNR, SSIM, LPIPS, rFID, codebook usage")
    from .eval import cli as eval_cli  # noqa: PLC0415

    eval_cli.add_arguments(e)
    e.set_defaults(func=eval_cli.run)
    g = sub.add_parser("generate", help="TokenFlow text-to-image: prompts -> PNGs")
    from .models.tokenflow import t2i_cli  # noqa: PLC0415

    t2i_cli.add_arguments(g)
    g.set_defaults(func=t2i_cli.run)
    i = sub.add_parser("info", help="versions, CUDA build, GPU, installed peers")
    i.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
