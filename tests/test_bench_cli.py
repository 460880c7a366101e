import json

import torch

import tokenflow_ext
from tokenflow_ext.__main__ import main


def test_bench_quick_writes_json_and_markdown(tmp_path, capsys):
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    status = main(["bench", "--quick", "--device", "cpu", "--repeats", "3", "--families", "search,gather,flow_step",
                   "--json", str(json_path), "--markdown", str(md_path), "--no-progress"])
    assert status == 0
    payload = json.loads(json_path.read_text())
    families = {row["family"] for row in payload["rows"]}
    assert families == {"codebook_search", "codebook_gather fwd+bwd", "flow step s=2 stacked",
                        "flow step s=2 stacked in place"}
    baselines = {row["baseline"] for row in payload["rows"] if row["family"] == "codebook_search"}
    assert {"official-eager", "lean-eager", "torch.compile"} <= baselines
    assert {row["baseline"] for row in payload["rows"] if row["family"] == "codebook_gather fwd+bwd"} == {
        "eager-index", "torch.compile"}
    for row in payload["rows"]:
        assert row["ok"] and row["ours_ms"] > 0
    assert payload["machine"] and payload["date"]
    markdown = md_path.read_text()
    assert markdown.startswith("# tokenflow_ext benchmark:") and "| codebook_search |" in markdown
    assert "speedup" in capsys.readouterr().out


def test_bench_fails_when_a_kernel_is_wrong(monkeypatch, capsys):
    real_search = tokenflow_ext.codebook_search

    def broken_search(x, *args, **kwargs):
        indices, distance = real_search(x, *args, **kwargs)
        return (indices + 1) % 4096, distance  # every index off by one

    monkeypatch.setattr(tokenflow_ext, "codebook_search", broken_search)
    status = main(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--families", "search", "--no-progress"])
    assert status == 1
    assert "CHECK FAILED" in capsys.readouterr().err


def test_info_lists_build_and_peers(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch_runtime: {torch.__version__}" in out and "with_cuda:" in out and "peer faiss:" in out


def test_sizes_override_and_plot(tmp_path):
    json_path, png_path = tmp_path / "r.json", tmp_path / "speedup.png"
    status = main(["bench", "--device", "cpu", "--repeats", "1", "--families", "search,flow_step", "--sizes",
                   "300x700,600x700,4x77x16", "--json", str(json_path), "--plot", str(png_path), "--no-progress"])
    assert status == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert {row["shape"] for row in rows if row["family"] == "codebook_search"} == {
        "N=300 K=700 D=32+8 w=0.5", "N=600 K=700 D=32+8 w=0.5"}
    assert {row["shape"] for row in rows if row["family"].startswith("flow step")} == {"4x77x16"}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "--sizes", "12xabc", "--device", "cpu"]) == 2
    assert main(["bench", "--families", "search,warp", "--device", "cpu"]) == 2
    assert main(["bench", "--families", "flow_step", "--sizes", "100x200", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not like 8192x16384" in err and "unknown families ['warp']" in err and "no case matches" in err
