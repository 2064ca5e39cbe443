"""Ahead-of-time compile check of the one-launch backward forms (kernels/bwd_fused.py; issue 18): every listed row
of configs.ROWS["fused"] and ["atomic"] compiles for sm_80 and sm_90 (where listed), fp16/bf16, every head dim
it claims, causal and not (where listed), within shared memory and with no spills; and sm_90 has a spill-free
wgmma row for the hot classes. Runs `python -m kernels.compile_check_bwd --json` once, in a subprocess without
TRITON_INTERPRET. The separate dK/dV and dQ rows are checked by test_compile.py. Select with `pytest -m aot`."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.aot

from kernels.compile_check import SMEM_LIMIT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def fused_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_bwd") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check_bwd", "--kernels", "fused,atomic",
                           "--dtypes", "fp16,bf16", "--json", str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"ahead-of-time compilation failed:\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("kernel", ["fused", "atomic"])
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])  # no fp32 rows: fp32 runs the separate form
@pytest.mark.parametrize("d", [16, 32, 64, 128])
def test_compile_fused_rows(fused_results, kernel, arch, dtype, d):
    rows = [r for r in fused_results if r["kernel"] == kernel and r["arch"] == arch and r["dtype"] == dtype
            and r["head_dim"] == d]
    assert {r["causal"] for r in rows} == {False, True}, f"{kernel} sm_{arch} {dtype} d={d}: no row for a class"
    for r in rows:
        where = f"{kernel} sm_{arch} {dtype} d={d} causal={r['causal']} [{r['config']}]"
        assert r["shared"] <= SMEM_LIMIT[arch], f"{where}: {r['shared']} B shared memory"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{where}: {r['spill_stores']}/{r['spill_loads']} B spill stores/loads ({r['registers']} registers)")


# Where a spill-free wgmma row must exist on sm_90 (fp16/bf16). The fused causal kernel (four loop bodies) has none
# at d = 64: its causal rows are mma.sync (configs.FUSED_ROWS).
WGMMA = [("fused", 64, False), ("fused", 128, False), ("fused", 128, True), ("atomic", 64, False),
         ("atomic", 64, True), ("atomic", 128, False), ("atomic", 128, True)]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("kernel,d,causal", WGMMA)
def test_compile_fused_hopper_wgmma_row(fused_results, kernel, d, causal, dtype):
    rows = [r for r in fused_results if r["kernel"] == kernel and r["arch"] == 90 and r["dtype"] == dtype
            and r["head_dim"] == d and r["causal"] == causal]
    assert any(r["mma"] == "wgmma" and r["spill_stores"] == 0 for r in rows), \
        [(r["config"], r["mma"], r["spill_stores"]) for r in rows]


# The one-launch forms in the head-layout variants (compile_check.VARIANTS: GQA's group loops, the halves value,
# v2): every row those problems are listed for (configs._VARIANT_SPILLS prunes the rows that spill) is clean. bf16
# at the language-model head dims; fp16 compiles to the same registers.
VARIANTS = ["gqa", "halves", "halvesgqa", "v2", "v2gqa"]


@pytest.fixture(scope="session", params=VARIANTS)
def variant_results(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_bwd_variant") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check_bwd", "--kernels", "fused,atomic",
                           "--dtypes", "bf16", "--head-dims", "64,128", "--variant", request.param, "--json",
                           str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"ahead-of-time compilation failed:\n{proc.stderr[-4000:]}"
    return request.param, json.loads(path.read_text())


def test_compile_fused_rows_head_layout_variants(variant_results):
    variant, results = variant_results
    assert {r["kernel"] for r in results} == {f"fused_{variant}", f"atomic_{variant}"}
    for r in results:
        where = f"{r['kernel']} sm_{r['arch']} d={r['head_dim']} causal={r['causal']} [{r['config']}]"
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], f"{where}: {r['shared']} B shared memory"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{where}: {r['spill_stores']}/{r['spill_loads']} B spill stores/loads ({r['registers']} registers)")
