"""The ``peers`` bench family: vector-quantize-pytorch and faiss-cpu on our codebook, beside our ops."""

import importlib.util
import json

import pytest
import torch

import tokenflow_ext
from tokenflow_ext.__main__ import main
from tokenflow_ext.bench import cases, peers
from tokenflow_ext.bench.codebook import lean_concat_search
from tokenflow_ext.bench.peers import PeersProblem, agreement_text, run_peers_case

HAS_VQ = importlib.util.find_spec("vector_quantize_pytorch") is not None
HAS_FAISS = importlib.util.find_spec("faiss") is not None
TINY = PeersProblem(96, 160)


def test_family_is_registered_with_its_grid_sizes():
    assert "peers" in cases.FAMILIES and cases.RUNNERS["peers"] is run_peers_case
    sizes = {mode: [(p.n, p.k) for f, p in cases.grid(mode) if f == "peers"] for mode in ("quick", "default", "full")}
    assert sizes == {"quick": [(1024, 4096)], "default": [(4096, 16384)], "full": [(8192, 16384), (4096, 16384)]}
    overridden = cases.cases_for("default", ["peers"], [(30, 70), (4, 77, 16)])
    assert [(f, type(p), p.n, p.k) for f, p in overridden] == [("peers", PeersProblem, 30, 70)]
    assert cases.problem_size(PeersProblem(30, 70)) == 30 * 70


def test_agreement_text():
    assert agreement_text(1.0, 0.0, True) == "100.00%"
    assert agreement_text(0.5, 3e-7, True) == "50.00% (ties, gap 3.0e-07)"
    assert agreement_text(0.5, 0.2, False).endswith("FAIL")


@pytest.mark.skipif(not (HAS_VQ and HAS_FAISS), reason="needs both peers (pip install '.[peers]')")
def test_rows_for_both_peers_agree_on_well_separated_codes():
    rows = run_peers_case(TINY, "cpu", repeats=1)
    assert [row.family for row in rows] == ["peers: quantize fwd+bwd", "peers: codebook_search"]
    assert rows[0].baseline.startswith("vector-quantize-pytorch ") and rows[1].baseline.startswith("faiss-cpu ")
    for row in rows:
        assert row.ok and not row.note and row.baseline_ms > 0 and row.ours_ms > 0
        assert row.agreement.startswith("100.00%") and row.extra["peer_version"]
    assert rows[0].agreement == "100.00%, grads match"


@pytest.mark.skipif(not HAS_VQ, reason="vector-quantize-pytorch not installed")
def test_vector_quantize_searches_our_codebook_without_changing_it():
    x, semantic, pixel = TINY.tensors("cpu")
    vq = peers.vector_quantize_module(semantic, pixel, TINY.pixel_weight)
    assert vq.training and vq._codebook.embed.shape == (1, TINY.k, 40)
    before = vq._codebook.embed.clone()
    expected = lean_concat_search(x, semantic, pixel, TINY.pixel_weight)
    for _ in range(3):  # training-mode forwards: a live EMA update would move the codes
        leaf = x.detach().requires_grad_()
        quantized, indices, _ = vq(peers._concat_input(leaf, TINY.semantic_dim, TINY.pixel_weight)[None])
        quantized.sum().backward()
        assert torch.equal(indices[0], expected) and leaf.grad is not None
    assert torch.equal(vq._codebook.embed, before)


@pytest.mark.skipif(not HAS_VQ, reason="vector-quantize-pytorch not installed")
def test_a_disagreeing_index_is_reported_and_fails(monkeypatch):
    real = tokenflow_ext.quantize

    def off_by_one(x, *args, **kwargs):
        result = real(x, *args, **kwargs)
        return result._replace(indices=(result.indices + 1) % TINY.k)

    monkeypatch.setattr(tokenflow_ext, "quantize", off_by_one)
    row = run_peers_case(TINY, "cpu", repeats=1)[0]
    assert not row.ok and row.agreement.startswith("0.00%") and row.agreement.endswith("FAIL")


def test_missing_peers_give_skip_rows(monkeypatch):
    real_find_spec = importlib.util.find_spec
    missing = ("faiss", "vector_quantize_pytorch")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real_find_spec(name, *a))
    rows = run_peers_case(TINY, "cpu", repeats=1)
    assert [(row.baseline, row.note, row.ok, row.baseline_ms) for row in rows] == [
        ("vector-quantize-pytorch", "vector-quantize-pytorch not installed", True, None),
        ("faiss-cpu", "faiss-cpu not installed", True, None)]
    assert all(row.ours_ms > 0 and row.agreement == "-" for row in rows)


def test_cli_accepts_families_peers(tmp_path):
    json_path = tmp_path / "r.json"
    status = main(["bench", "--device", "cpu", "--repeats", "1", "--families", "peers", "--sizes", "64x128",
                   "--json", str(json_path), "--no-progress"])
    assert status == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert {row["family"] for row in rows} == {"peers: quantize fwd+bwd", "peers: codebook_search"}
    assert {row["shape"] for row in rows} == {"N=64 K=128 D=32+8 w=0.5"}
