"""The benchmark harness itself, on CPU: smoke runs write valid JSON/PNG with every provider; FLOP formulas;
skip reasons."""

import json

import pytest
import torch

from benchmarks import bench_diff_attn, bench_model, common, op_case, verdicts
from benchmarks.providers import PROVIDERS, skip_reason


def test_flop_formulas():
    assert common.flops_fwd(1, 1, 10, 64, False) == 12 * 100 * 64
    assert common.flops_fwd(2, 3, 10, 64, True) == 6 * 100 * 64 * 2 * 3
    assert common.flops_bwd(1, 1, 10, 64, False) == 20 * 100 * 64
    assert common.flops("fwd+bwd", 1, 1, 10, 64, False) == 32 * 100 * 64


def test_triton_skip_reason_outside_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = skip_reason("triton", torch.device("cpu"))
    assert reason and "TRITON_INTERPRET=1" in reason
    assert skip_reason("sdpa2", torch.device("cpu")) is None


def test_op_smoke_writes_every_provider(tmp_path):
    out, png = tmp_path / "op.json", tmp_path / "op.png"
    assert bench_diff_attn.main(["--smoke", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "git_sha", "date", "rows", "flops"):
        assert key in data
    rows = data["rows"]
    assert {r["provider"] for r in rows} == set(PROVIDERS)
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert (r["ms"] is not None) != (r["skipped"] is not None), r
        if r["ms"] is not None:
            assert r["ms"] > 0 and r["tflops"] > 0 and r["rel_err"] <= 1e-4
    assert all(r["ms"] for r in rows), [r for r in rows if not r["ms"]]
    for r in rows:
        assert r["n"] >= 3 and r["ms_min"] <= r["ms"] <= r["ms_max"], r
        others = [o for o in rows if o["provider"] not in ("triton", r["provider"]) and o["ms"]
                  and all(o[k] == r[k] for k in verdicts.CASE_KEYS)]
        best = min(others, key=lambda o: o["ms"])
        assert r["best_baseline"] == best["provider"] and r["speedup_vs_best"] == pytest.approx(best["ms"] / r["ms"])
    for form in ("fused", "atomic"):  # the backward-form providers ran their form (and have no forward-only rows)
        form_rows = [r for r in rows if r["provider"] == f"triton-bwd-{form}"]
        assert form_rows and all(r["mode"] != "fwd" and form in r["configs"] for r in form_rows), form_rows
    compiled = [r for r in rows if r["provider"].endswith("compile")]
    assert compiled and all(r["compiled_graphs"] >= 1 for r in compiled)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_times_every_fitting_config_and_records_choices(tmp_path):
    from benchmarks import sweep
    from kernels import configs

    out = tmp_path / "sweep.json"
    assert bench_diff_attn.main(["--smoke", "--modes", "fwd+bwd", "--providers", "triton", "--sweep", "reduced",
                                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    triton_rows = [r for r in data["rows"] if r["provider"] == "triton"]
    assert triton_rows and all(set(r["configs"]) == set(configs.KERNELS) for r in triton_rows)
    sweep_rows = data["sweep"]
    p = configs.Problem(16, 4, True, 40, 90)  # the smoke sweep shape, fp32, interpreter (sm 90)
    for kernel, (listed, _) in sweep.SWEPT.items():  # fwd-train too: the training forward is swept
        timed = {r["config"] for r in sweep_rows if r["kernel"] == kernel and r["ms"] and r["ms_repeat"]}
        assert timed == {configs.describe(r.config()) for r in configs.fitting_rows(listed, p)}, kernel


def test_failed_check_is_reported_not_timed(monkeypatch):
    from benchmarks import providers

    monkeypatch.setitem(providers.PROVIDERS, "sdpa2", lambda q, k, v, lam, causal=False: v * 2)
    row = op_case.run_case("sdpa2", "x", 1, 1, 8, 16, False, "fp32", "fwd", torch.device("cpu"))
    assert row["ms"] is None and row["skipped"].startswith("output check failed")


def test_model_smoke(tmp_path):
    out, png = tmp_path / "model.json", tmp_path / "model.png"
    assert bench_model.main(["--smoke", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["backend"] for r in rows} == set(bench_model.BACKENDS)
    assert {r["task"] for r in rows} == {"encode_image", "encode_text", "train_step"}
    assert all(r["ms"] and r["per_s"] > 0 for r in rows), [r for r in rows if not r["ms"]]
    assert png.exists()


def test_targets_are_evaluated_from_rows():
    def row(provider, ms, shape="vision", mode="fwd", B=256, tflops=None, spread=0.01):
        return dict(provider=provider, ms=ms, ms_min=ms - spread, ms_max=ms + spread, shape=shape, mode=mode,
                    dtype="bf16", B=B, H=6, N=197, d=64, causal=False, tflops=tflops)

    rows = [row("triton", 1.0), row("sdpa2", 2.1), row("sdpa4", 1.2), row("eager", 7.0),
            row("triton", 9.0, B=1), row("sdpa2", 1.0, B=1),  # smaller batch: ignored
            row("triton", 2.0, shape="long-d64", mode="bwd", B=4, tflops=400.0),
            row("triton", 1.0, shape="text"), row("sdpa2", 1.6, shape="text", spread=0.7)]  # within noise
    verdicts.add_speedups(rows)
    got = {t["target"]: t for t in verdicts.evaluate_targets(rows)}
    vision = got["vision fwd >= 2.0x sdpa2 (B=256)"]
    assert vision["met"] and vision["value"] == 2.1
    assert vision["best_baseline"] == "sdpa4" and vision["vs_best"] == pytest.approx(1.2)
    assert got["long-d64 bwd >= 300 TFLOP/s (B=4)"]["met"]
    text = got["text fwd >= 1.5x sdpa2 (B=256)"]
    assert text["value"] == 1.6 and text["noise"] and not text["met"]  # over the bar, but inside the spread
    assert not any(k.startswith("long-d128") for k in got)  # no rows, no verdict


def test_sweep_budget_skips_rows_and_main_table_is_written_first(tmp_path, monkeypatch):
    """A spent sweep budget records the remaining rows as skipped; the main table is on disk before the sweep
    starts, so a sweep killed by a time limit (as on the first device run) keeps it."""
    from benchmarks import sweep

    out = tmp_path / "op.json"
    seen = {}

    def spy(shapes, dtype_name, device, budget_s=None, **kw):
        seen["on_disk"] = json.loads(out.read_text())["rows"]
        return real(shapes, dtype_name, device, budget_s=0.0, **kw)

    real = sweep.run_sweep
    monkeypatch.setattr(sweep, "run_sweep", spy)
    assert bench_diff_attn.main(["--smoke", "--modes", "fwd", "--providers", "triton", "--sweep", "reduced",
                                 "--sweep-budget-s", "0", "--json", str(out)]) == 0
    assert seen["on_disk"] and {r["provider"] for r in seen["on_disk"]} == {"triton"}
    rows = json.loads(out.read_text())["sweep"]
    assert rows and all(r["ms"] is None and "time budget" in r["skipped"] for r in rows)


def test_host_ms_is_none_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert common.host_ms(lambda: None) is None


def test_profile_smoke_writes_json(tmp_path):
    from benchmarks import profile_op

    out = tmp_path / "prof.json"
    assert profile_op.main(["--smoke", "--providers", "triton,sdpa2", "--steps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["triton", "sdpa2"]
    for r in rows:
        assert "skipped" not in r, r
        assert r["host_us_per_step"] is None  # host time comes from host_ms, which needs a GPU
        assert r["top_host"] and r["steps"] == 2


def test_graph_ms_plumbing_and_failure_reason(monkeypatch):
    """CUDA graphs need a GPU: here make_graphed_callables is replaced (identity, then a failure) so the
    benchmark's handling of both outcomes is checked on CPU."""
    from benchmarks.providers import PROVIDERS

    q, k, v, lam = common.qkv_inputs(1, 1, 8, 16, torch.float32, torch.device("cpu"), grad=True)
    fn = PROVIDERS["sdpa2"]
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda f, args: f)
    t, why = op_case.graph_timing(fn, q, k, v, lam, False, "fwd+bwd")
    assert t["ms"] > 0 and why is None and q.grad is not None

    def refuse(f, args):
        raise RuntimeError("capture failed\nsecond line")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", refuse)
    assert op_case.graph_timing(fn, q, k, v, lam, False, "fwd") == (None, "RuntimeError: capture failed")
