"""benchmarks/device_check.sh, dry-run on CPU: the script's plumbing (arguments, outputs, exit status) is checked
here so that a lent GPU's minutes are not spent finding a typo."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is the real check, not a test")
def test_device_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dry run" in proc.stdout
    files = sorted(os.listdir(tmp_path))
    assert files == ["bench_diff_attn.json", "bench_diff_attn.log", "bench_diff_attn.png", "bench_model.json",
                     "bench_model.log", "environment.txt", "gpu_tests.log", "profile.json"]
    assert len(files) <= 8  # the device tool returns at most 8 files from $OUT
    op = json.loads((tmp_path / "bench_diff_attn.json").read_text())
    assert {r["provider"] for r in op["rows"]} == {"triton", "eager", "sdpa2", "sdpa4"}
    assert {r["mode"] for r in op["rows"]} == {"fwd", "fwd+bwd"}
    assert op["sweep"] and all(r["ms"] for r in op["sweep"])  # the reduced config sweep ran (smoke shape on CPU)
    assert all("host_ms" in r for r in op["rows"])
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert [(r["provider"], "skipped" in r) for r in prof["rows"]] == [("triton", False), ("sdpa2", False)]
    log = (tmp_path / "gpu_tests.log").read_text()
    assert "===== kernels tests: exit 0" in log and "===== model tests: exit" in log
