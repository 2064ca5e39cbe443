"""benchmarks/device_check.sh, dry-run on CPU: the script's plumbing (arguments, outputs, exit status) is checked
here so that a lent GPU's minutes are not spent finding a typo."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.providers import PROVIDERS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is the real check, not a test")
def test_device_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dry run" in proc.stdout
    files = sorted(os.listdir(tmp_path))
    assert files == ["bench_diff_attn.json", "bench_diff_attn.log", "bench_model.json", "bench_model.log",
                     "gpu_tests.log", "profile.json", "profile.log", "profile_model.json"]
    assert len(files) <= 8  # the device tool returns at most 8 files from $OUT
    op = json.loads((tmp_path / "bench_diff_attn.json").read_text())
    assert {r["provider"] for r in op["rows"]} == set(PROVIDERS)
    assert all(r["ms"] for r in op["rows"]), [r for r in op["rows"] if not r["ms"]]
    # the reduced config sweep ran, both passes (smoke shape on CPU)
    assert op["sweep"] and all(r["ms"] and r["ms_repeat"] for r in op["sweep"])
    assert all("host_ms" in r and "speedup_vs_best" in r for r in op["rows"])
    assert "warmed 1 cases" in (tmp_path / "bench_diff_attn.log").read_text()  # the cache was warmed first
    # the LM benchmark's rows sit under "lm" in the op benchmark's file (no ninth file), each checked and timed
    lm = op["lm"]
    assert lm["benchmark"] == "lm" and {r["form"] for r in lm["rows"]} == {"decode", "varlen"}
    assert all(r["ms"] for r in lm["rows"]), [r for r in lm["rows"] if not r["ms"]]
    head = (tmp_path / "bench_diff_attn.log").read_text().splitlines()[:3]  # the environment heads the op log
    assert any(line.startswith("torch ") and "triton" in line for line in head), head
    model = json.loads((tmp_path / "bench_model.json").read_text())
    assert {r["backend"] for r in model["rows"]} == {"eager", "sdpa", "triton", "plain-clip", "triton+compile",
                                                      "plain-clip+compile", "sdpa+compile"} and model["note"]
    prof = json.loads((tmp_path / "profile_model.json").read_text())
    assert [r["backend"] for r in prof["rows"]] == ["sdpa", "triton", "plain-clip"]
    assert all(r["wall_ms_per_step"] > 0 for r in prof["rows"]), prof["rows"]
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert [(r["provider"], "skipped" in r) for r in prof["rows"]] == [("triton", False), ("sdpa2", False)]
    log = (tmp_path / "gpu_tests.log").read_text()
    assert "===== kernels tests: exit 0" in log and "===== model tests: exit" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is the real check, not a test")
def test_device_check_compile_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check_compile.sh"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_model_compile.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"sdpa", "triton", "plain-clip", "sdpa+compile", "triton+compile",
                                             "plain-clip+compile"}
    assert all(r["ms"] for r in rows), [r for r in rows if not r["ms"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is the real check, not a test")
def test_device_sweep_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_sweep.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["rows"] == [] and data["sweep"], data  # the sweep alone
    assert all(r["ms"] and r["ms_repeat"] for r in data["sweep"]), data["sweep"]
    assert "sweep winner" in proc.stdout
