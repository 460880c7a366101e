"""Command line: ``python -m tokenflow_ext bench`` (the main job) and ``python -m tokenflow_ext info``."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import shlex
import sys

import torch

import tokenflow_ext

PEERS = ["faiss", "flow_matching", "torchdiffeq", "matplotlib"]
FAMILIES = ["search", "gather", "quantize", "flow_train", "flow_step", "flow_loop"]


def _sizes(mode: str):
    from .bench.codebook import CodebookProblem  # noqa: PLC0415
    from .bench.flow import FlowProblem  # noqa: PLC0415

    flowtok, wide = (256, 77, 16), (64, 4096, 64)
    if mode == "quick":
        return [("search", CodebookProblem(2048, 4096)), ("gather", CodebookProblem(16384, 8192)),
                ("quantize", CodebookProblem(1024, 4096)), ("flow_train", FlowProblem(flowtok)),
                ("flow_step", FlowProblem(flowtok)), ("flow_loop", FlowProblem(flowtok))]
    cases = [("search", CodebookProblem(8192, 16384)), ("gather", CodebookProblem(65536, 32768)),
             ("quantize", CodebookProblem(4096, 16384))]
    for shape in (flowtok, wide):
        cases += [("flow_train", FlowProblem(shape)), ("flow_train", FlowProblem(shape, torch.bfloat16)),
                  ("flow_step", FlowProblem(shape)), ("flow_step", FlowProblem(shape, torch.bfloat16)),
                  ("flow_step", FlowProblem(shape, layout="split")),
                  ("flow_step", FlowProblem(shape, guidance_scale=1.0)), ("flow_loop", FlowProblem(shape))]
    if mode == "full":
        cases += [("flow_loop", FlowProblem(flowtok, steps=50)), ("flow_step", FlowProblem(flowtok, guidance_scale=4.0)),
                  ("flow_step", FlowProblem(wide, torch.bfloat16, layout="split"))]
        cases += [("search", CodebookProblem(8192, 16384, pixel_weight=1.0)),
                  ("search", CodebookProblem(65536, 32768)),
                  ("search", CodebookProblem(729, 32768)),
                  ("search", CodebookProblem(8192, 16384, semantic_dim=8, pixel_dim=0))]
    return cases


def bench(args) -> int:
    from .bench import codebook, flow, report  # noqa: PLC0415
    from .bench.timing import machine_description  # noqa: PLC0415

    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        print(f"bench: unknown families {unknown}; choose from {FAMILIES}", file=sys.stderr)
        return 2
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not (torch.cuda.is_available() and tokenflow_ext.build_info()["with_cuda"]):
        if args.device == "cuda":
            print("bench: --device cuda needs a visible GPU and tokenflow_ext built with CUDA kernels", file=sys.stderr)
            return 2
        devices.remove("cuda")
    runners = {"search": codebook.run_search_case, "gather": codebook.run_gather_case,
               "quantize": codebook.run_quantize_case, "flow_train": flow.run_flow_train_case,
               "flow_step": flow.run_flow_step_case, "flow_loop": flow.run_flow_loop_case}
    rows = []
    machines = []
    for device in devices:
        machines.append(machine_description(device))
        cases = [(family, problem) for family, problem in _sizes(args.mode) if family in args.families]
        for number, (family, problem) in enumerate(cases, 1):
            label = problem.shape if isinstance(problem.shape, str) else problem.label()
            print(f"[{device} {number}/{len(cases)}] {family} {label} ...", file=sys.stderr, flush=True)
            rows += runners[family](problem, device, repeats=args.repeats)
    machine = "; ".join(machines)
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
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="the PERF.md grid (minutes)")
    b.set_defaults(mode="default")
    b.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--families", type=lambda s: [f.strip() for f in s.split(",")], default=FAMILIES,
                   help=f"comma-separated subset of {','.join(FAMILIES)}")
    b.add_argument("--markdown", metavar="PATH")
    b.add_argument("--json", metavar="PATH")
    b.set_defaults(func=bench)
    i = sub.add_parser("info", help="versions, CUDA build, GPU, installed peers")
    i.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
