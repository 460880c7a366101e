"""Command line: ``python -m tokenflow_ext bench`` (the main job), ``python -m tokenflow_ext tokenize IMAGE...
--checkpoint PATH`` (TokenFlow indices and reconstructions) and ``python -m tokenflow_ext info``.

Also installed as the ``tokenflow-ext`` console script.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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
    rows, sized_rows = [], []
    progress = tqdm(planned, desc="bench", unit="case", disable=args.no_progress, file=sys.stderr)
    for device, family, problem in progress:
        progress.set_postfix_str(f"{device} {family} {case_grid.problem_label(problem)}")
        new_rows = case_grid.RUNNERS[family](problem, device, repeats=args.repeats)
        rows += new_rows
        sized_rows += [(row, case_grid.problem_size(problem)) for row in new_rows]
    machine = "; ".join(machine_description(device) for device in devices)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m tokenflow_ext " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"machine: {machine}\n")
    print(report.text_table(rows))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(rows, machine, date, command))
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json(rows, machine, date, command))
    if args.plot:
        from .bench.plot import plot_speedups  # noqa: PLC0415

        plot_speedups(sized_rows, args.plot, f"tokenflow_ext speedups: {machine} ({date})")
    failed = [row for row in rows if not row.ok]
    for row in failed:
        print(f"CHECK FAILED: {row.family} {row.shape} vs {row.baseline}: {row.agreement}", file=sys.stderr)
    return 1 if failed else 0


def info(_args) -> int:
    build = tokenflow_ext.build_info()
    for key, value in build.items():
        print(f"{key}: {value}")
    print(f"gpu: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    for peer in PEERS:
        print(f"peer {peer}: {'installed' if importlib.util.find_spec(peer) else 'not installed'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenflow_ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="fused ops vs eager PyTorch, torch.compile and installed peers")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes (seconds)")
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="PERF.md's grid (minutes)")
    b.set_defaults(mode="default")
    b.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    b.add_argument("--sizes", metavar="LIST",
                   help="override the grid: comma-separated NxK (codebook families) and BxLxD (flow families)")
    b.add_argument("--families", type=_families, default=["search", "gather", "quantize", "multiscale", "flow_train",
                                                           "flow_step", "flow_loop", "tokenizer", "flowtok", "t2i"],
                   help="comma-separated subset of search,gather,quantize,multiscale,flow_train,flow_step,flow_loop,"
                        "tokenizer,flowtok,t2i (multiscale, tokenizer, flowtok: whole models, --full only; t2i: the "
                        "sample_logits op, plus the t2i sampling loops with --full)")
    b.add_argument("--repeats", type=int, default=5, help="timed samples per implementation (median reported)")
    b.add_argument("--markdown", metavar="PATH", help="write the table as Markdown (benchmarks/results/ form)")
    b.add_argument("--json", metavar="PATH", help="write every row as JSON")
    b.add_argument("--plot", metavar="PATH", help="PNG of speedup against problem size (needs matplotlib)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=bench)
    t = sub.add_parser("tokenize", help="TokenFlow: images -> indices (.npy) and reconstructions (.png)")
    from .models.tokenflow import cli as tokenize_cli  # noqa: PLC0415

    tokenize_cli.add_arguments(t)
    t.set_defaults(func=tokenize_cli.run)
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
