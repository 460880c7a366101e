"""Which cases a benchmark run contains: the --quick / default / --full grids and the --sizes override."""

from __future__ import annotations

import torch

from . import codebook, flow, models, peers, t2i, train
from .codebook import CodebookProblem, MultiScaleProblem
from .flow import FlowProblem
from .models import FlowTokSampleProblem, TokenizerProblem
from .peers import PeersProblem
from .t2i import SampleOpProblem, T2IProblem
from .train import TrainStepProblem

FAMILIES = ["search", "gather", "quantize", "multiscale", "flow_train", "flow_step", "flow_loop", "tokenizer",
            "flowtok", "train", "t2i", "peers"]
CODEBOOK_FAMILIES = {"search", "gather", "quantize", "multiscale", "peers"}

RUNNERS = {
    "search": codebook.run_search_case,
    "gather": codebook.run_gather_case,
    "quantize": codebook.run_quantize_case,
    "multiscale": codebook.run_multiscale_case,
    "flow_train": flow.run_flow_train_case,
    "flow_step": flow.run_flow_step_case,
    "flow_loop": flow.run_flow_loop_case,
    "tokenizer": models.run_tokenizer_case,
    "flowtok": models.run_flowtok_sample_case,
    "train": train.run_train_case,
    "t2i": t2i.run_t2i_case,
    "peers": peers.run_peers_case,  # optional extras: vector-quantize-pytorch, faiss-cpu
}
# whole-model cases: full grid only, not --sizes (t2i: its sampling-op case also runs in the default grid)
MODEL_FAMILIES = {"multiscale", "tokenizer", "flowtok", "train", "t2i"}

FLOWTOK, WIDE = (256, 77, 16), (64, 4096, 64)


def grid(mode: str) -> list[tuple[str, object]]:
    """(family, problem) pairs. quick: seconds; default: a few minutes on 2 cores (measured 128 s of CPU, 5.8 min
    wall on a loaded 2-core machine, before the t2i sampling-op case); full: every size of
    benchmarks/results/cpu.md (an hour or more)."""
    t2i_op = [("t2i", SampleOpProblem()), ("t2i", SampleOpProblem(top_k=1200, top_p=0.8))]
    if mode == "quick":
        return [("search", CodebookProblem(2048, 4096)), ("gather", CodebookProblem(16384, 8192)),
                ("quantize", CodebookProblem(1024, 4096)), ("flow_train", FlowProblem(FLOWTOK)),
                ("flow_step", FlowProblem(FLOWTOK)), ("flow_loop", FlowProblem(FLOWTOK)),
                ("peers", PeersProblem(1024, 4096))]
    if mode == "default":
        return [("search", CodebookProblem(4096, 8192)), ("search", CodebookProblem(1024, 32768)),
                ("gather", CodebookProblem(65536, 32768)), ("quantize", CodebookProblem(2048, 8192)),
                ("flow_train", FlowProblem(FLOWTOK)), ("flow_step", FlowProblem(FLOWTOK)),
                ("flow_step", FlowProblem(FLOWTOK, torch.bfloat16)), ("flow_step", FlowProblem(WIDE)),
                ("flow_loop", FlowProblem(FLOWTOK))] + t2i_op[:1] + [("peers", PeersProblem(4096, 16384))]
    cases = [("search", CodebookProblem(8192, 16384)), ("search", CodebookProblem(8192, 16384, pixel_weight=1.0)),
             ("search", CodebookProblem(729, 32768)), ("search", CodebookProblem(8192, 16384, 8, 0)),
             ("search", CodebookProblem(65536, 32768)), ("gather", CodebookProblem(65536, 32768)),
             ("gather", CodebookProblem(65536, 32768, index_skew="one code")),
             ("quantize", CodebookProblem(4096, 16384)), ("multiscale", MultiScaleProblem()),
             ("peers", PeersProblem(8192, 16384)), ("peers", PeersProblem(4096, 16384))]
    for shape in (FLOWTOK, WIDE):
        cases += [("flow_train", FlowProblem(shape)), ("flow_train", FlowProblem(shape, torch.bfloat16)),
                  ("flow_step", FlowProblem(shape)), ("flow_step", FlowProblem(shape, torch.bfloat16)),
                  ("flow_step", FlowProblem(shape, layout="split")),
                  ("flow_step", FlowProblem(shape, guidance_scale=1.0)), ("flow_loop", FlowProblem(shape)),
                  ("flow_loop", FlowProblem(shape, steps=50))]
    # each model case times ours fp32, ours under bf16 autocast and the official path in one run (two rows)
    cases += [("tokenizer", TokenizerProblem(config, 8)) for config in ("clipb_256", "siglip_384")]
    cases += [("tokenizer", TokenizerProblem("clipb_256", 8, enhanced_decoder=True, op="decode")),
              ("flowtok", FlowTokSampleProblem("B", 64))]
    cases += [("train", TrainStepProblem("clipb_256", 2)), ("train", TrainStepProblem("siglip_384", 1))]
    cases += t2i_op + [("t2i", T2IProblem(refinement="loop1")), ("t2i", T2IProblem(refinement="loop3"))]
    return cases


def parse_sizes(text: str) -> list[tuple[int, ...]]:
    """'8192x16384,256x77x16' -> [(8192, 16384), (256, 77, 16)]: NxK for codebook cases, BxLxD for flow."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            dims = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes: {item!r} is not like 8192x16384 (N x K) or 256x77x16 (flow shape)") from None
        if len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"--sizes: {item!r} needs at least two positive dims")
        sizes.append(dims)
    return sizes


def cases_for(mode: str, families: list[str], sizes: list[tuple[int, ...]] | None) -> list[tuple[str, object]]:
    """The run's cases: the mode's grid, or the given sizes (2 dims: codebook N x K; more: a flow shape).
    The whole-model families (multiscale, tokenizer, flowtok) run in the full grid only."""
    if sizes is None:
        return [(family, problem) for family, problem in grid(mode) if family in families]
    cases = []
    for family in families:
        for dims in sizes:
            if family in MODEL_FAMILIES:
                continue
            if family in CODEBOOK_FAMILIES and len(dims) == 2:
                cases.append((family, (PeersProblem if family == "peers" else CodebookProblem)(*dims)))
            elif family not in CODEBOOK_FAMILIES and len(dims) > 2:
                cases.append((family, FlowProblem(dims)))
    return cases


def problem_label(problem) -> str:
    return problem.label() if isinstance(problem, FlowProblem) else problem.shape


def problem_size(problem) -> int:
    """The x axis of the speedup plot: N*K for codebook cases, elements for flow cases."""
    if isinstance(problem, CodebookProblem):
        return problem.n * problem.k
    if isinstance(problem, T2IProblem):
        return problem.batch * 817
    if isinstance(problem, SampleOpProblem):
        return 2 * problem.batch * problem.positions * problem.vocab
    if isinstance(problem, FlowTokSampleProblem):
        return problem.batch * problem.steps * 77 * 16
    if isinstance(problem, (TokenizerProblem, TrainStepProblem)):
        from tokenflow_ext.models.tokenflow import CONFIGS  # noqa: PLC0415

        return problem.batch * CONFIGS[problem.config].tokens_per_image * CONFIGS[problem.config].codebook_size
    if isinstance(problem, MultiScaleProblem):
        from tokenflow_ext.nn import SCALE_PRESETS  # noqa: PLC0415

        return problem.batch * sum(s * s for s in SCALE_PRESETS[problem.preset]) * problem.k
    size = 1
    for dim in problem.shape:
        size *= dim
    return size
