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


def test_rows_report_min_median_and_spread_and_flag_noisy_rows(tmp_path):
    json_path = tmp_path / "r.json"
    status = main(["bench", "--device", "cpu", "--repeats", "3", "--families", "gather", "--sizes", "64x128",
                   "--json", str(json_path), "--no-progress"])
    assert status == 0
    for row in json.loads(json_path.read_text())["rows"]:
        assert 0 < row["ours_min_ms"] <= row["ours_ms"] <= row["ours_p90_ms"]
        assert 0 < row["baseline_min_ms"] <= row["baseline_ms"] <= row["baseline_p90_ms"]
        low, high = row["speedup_range"]
        assert low <= row["speedup"] <= high and row["repeats"] == 3
        assert row["noisy"] == (high > 1.5 * low)


def test_interleaved_samples_alternate_between_implementations():
    from tokenflow_ext.bench.timing import time_interleaved

    calls = []
    ours, theirs = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", warmup=0,
                                    repeats=4, min_sample_ms=0.0)
    assert ours.repeats == theirs.repeats == 4
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # after one calibration call each


def test_noisy_flag_and_report_columns():
    from tokenflow_ext.bench import report
    from tokenflow_ext.bench.rows import Row

    common = dict(family="f", shape="s", dtype="float32", device="cpu", baseline="b", baseline_peak=None,
                  ours_peak=None, agreement="ok", ok=True)
    steady = Row(**common, baseline_ms=10.0, ours_ms=5.0, ours_min_ms=4.9, ours_p10_ms=4.9, ours_p90_ms=5.1,
                 baseline_min_ms=9.9, baseline_p10_ms=9.9, baseline_p90_ms=10.2)
    swinging = Row(**common, baseline_ms=12.0, ours_ms=12.0, ours_min_ms=0.4, ours_p10_ms=0.4, ours_p90_ms=16.0,
                   baseline_min_ms=3.0, baseline_p10_ms=3.0, baseline_p90_ms=20.0)
    assert not steady.noisy and swinging.noisy
    table = report.text_table([steady, swinging])
    assert "min 4.90" in table and "NOISY" in table and "speedup range" in table
    assert "1 of 2 rows are NOISY" in report.legend([steady, swinging])
    assert "sampled in turns." in report.legend([steady])
    alone = Row(**{**common, "family": "tokenizer train step"}, baseline_ms=10.0, ours_ms=9.0, interleaved=False)
    assert "(except tokenizer train step: each implementation built, timed and freed in turn" in report.legend(
        [steady, alone])


def test_argument_errors_fail_before_the_run(tmp_path, monkeypatch, capsys):
    from tokenflow_ext.bench import cases

    def no_run(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(cases, "cases_for", no_run)
    base = ["bench", "--quick", "--device", "cpu", "--no-progress"]
    assert main(base + ["--repeats", "0"]) == 2
    assert main(base + ["--threads", "0"]) == 2
    assert main(base + ["--markdown", str(tmp_path / "missing" / "r.md")]) == 2
    assert main(base + ["--json", str(tmp_path / "missing" / "r.json")]) == 2
    assert main(base + ["--plot", str(tmp_path)]) == 2  # a directory
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert main(base + ["--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--repeats must be at least 1" in err and "does not exist" in err and "needs matplotlib" in err


def test_load_warning_names_the_cause(monkeypatch):
    from tokenflow_ext.bench import timing

    monkeypatch.setattr(timing, "machine_load", lambda: (24.0, 2))
    assert "scheduler ticks" in timing.load_warning(2)
    monkeypatch.setattr(timing, "machine_load", lambda: (0.3, 2))
    assert timing.load_warning(2) is None


def test_whole_model_rows_carry_the_spread():
    from tokenflow_ext.bench.codebook import MultiScaleProblem, run_multiscale_case
    from tokenflow_ext.bench.models import compare_models

    (row,) = run_multiscale_case(MultiScaleProblem(batch=1, preset="clipb_224", k=256), "cpu", repeats=2)
    assert row.ok and row.repeats == 2 and row.speedup_range is not None
    calls = []
    callables = {"fused": lambda: calls.append("fused") or 1, "official-eager": lambda: calls.append("eager") or 1}
    (row,) = compare_models("toy", "s", 4, callables, "cpu", lambda a, b, variant: (a == b, "same"), repeats=2)
    assert calls == ["fused", "eager", "fused", "eager", "eager", "fused"]  # warm-up, then alternating rounds
    assert row.ok and row.ours_min_ms <= row.ours_ms and row.extra["images_per_s"] > 0
    # a "fused <variant>" entry is timed in the same rounds and gets its own row against the same baseline
    callables["fused bf16"] = lambda: calls.append("bf16") or 2
    calls.clear()
    rows = compare_models("toy", "s", 4, callables, "cpu", lambda a, b, variant: (variant or a == b, str(variant)),
                          repeats=2, warmup=False)
    assert calls == ["fused", "eager", "bf16", "bf16", "eager", "fused"]
    assert [(r.dtype, r.agreement.split(";")[0], r.baseline_ms) for r in rows] == [
        ("float32", "None", rows[0].baseline_ms), ("bf16-autocast", "bf16", rows[0].baseline_ms)]
