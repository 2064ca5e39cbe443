"""benchmarks/sanitize_check.sh, dry-run on CPU: the script's plumbing (call lists, log files, summary, exit status)
is checked here so that a lent GPU's minutes are not spent finding a typo. The real run (compute-sanitizer's
memcheck, initcheck, synccheck and racecheck) needs CUDA."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "sanitize_check.sh")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is the real check")


def _run(out, python):
    env = dict(os.environ, PYTHON=python, PYTHONWARNINGS="ignore")
    return subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=120)


def test_sanitize_check_dry_run(tmp_path):
    proc = _run(tmp_path, sys.executable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dry run" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["sanitize_memcheck.log", "sanitize_racecheck.log",
                                            "sanitize_summary.txt"]
    assert (tmp_path / "sanitize_summary.txt").read_text().splitlines() == ["memcheck: exit 0, ok",
                                                                            "racecheck: exit 0, ok"]
    full = (tmp_path / "sanitize_memcheck.log").read_text()
    small = (tmp_path / "sanitize_racecheck.log").read_text()
    assert "12 calls (full, dry run)" in full and "4 calls (small, dry run)" in small
    for name in ("N1-", "N77-", "N197-", "N1000-", "d64", "d128", "fp16", "bf16", "fp32", "causal", "full",
                 "split", "fused", "linear", "infer-"):
        assert name in full, name


def test_sanitize_check_fails_when_the_calls_fail(tmp_path):
    """A step that fails makes the script fail (here: no Python at all)."""
    proc = _run(tmp_path, "false")
    assert proc.returncode != 0
    assert "memcheck: exit 1, failed" in (tmp_path / "sanitize_summary.txt").read_text()
