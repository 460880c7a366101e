"""The t2i bench family (issue 13, part 6) at toy sizes: rows are produced, checked and labelled."""

import torch

from tokenflow_ext.bench import cases
from tokenflow_ext.bench.t2i import SampleOpProblem, T2IProblem, run_t2i_case


def test_sample_op_case_checks_the_kept_set():
    (row,) = run_t2i_case(SampleOpProblem(batch=1, positions=3, vocab=300, image_token_start=44, top_k=20), "cpu")
    assert row.ok and row.family == "t2i sample_logits" and row.baseline == "official"
    assert row.agreement.startswith("100.00% of codes in the official kept set")


def test_model_case_reports_tokens_and_images_per_second():
    torch.set_num_threads(1)
    rows = run_t2i_case(T2IProblem(layers=1, width=64, batch=1, refinement="loop1", prefix=6), "cpu")
    assert [row.extra["sampler"] for row in rows] == ["cached", "cached-fused"]
    assert rows[1].shape.endswith(", cached-fused")
    assert all(row.ok for row in rows), [row.agreement for row in rows]
    assert "100.00% codes equal" in rows[0].agreement and "images/s" in rows[1].agreement
    assert rows[0].extra["tokens_per_s"] > 0 and rows[1].extra["baseline_images_per_s"] > 0


def test_t2i_is_a_bench_family():
    assert "t2i" in cases.FAMILIES
    full = [problem for family, problem in cases.grid("full") if family == "t2i"]
    assert {getattr(p, "refinement", None) for p in full} >= {"loop1", "loop3"}
    assert not [f for f, _ in cases.grid("quick") if f == "t2i"]
