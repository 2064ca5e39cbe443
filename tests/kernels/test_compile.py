"""GPU compile check, on any machine: every default config of every kernel is compiled ahead of time for sm_80
and sm_90 (fp16, bf16 and fp32; d = 16, 32, 64 and 128; causal and not). Shared memory must fit the architecture
and ptxas must report no spill stores or loads. Triton's interpreter accepts code that this step rejects, so keep
it green.

The compilation runs once, in a subprocess without TRITON_INTERPRET (the interpreter's @triton.jit objects cannot
be compiled), through `python -m kernels.compile_check --json`. Select with `pytest -m aot` (test names also
contain "compile").
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.aot

from kernels.compile_check import SMEM_LIMIT  # noqa: E402

ARCHS = [80, 90]
DTYPES = ["fp16", "bf16", "fp32"]  # fp32: the ieee-dot correctness path, one small config per kernel
HEAD_DIMS = [16, 32, 64, 128]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def compile_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--json", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"ahead-of-time compilation failed:\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text())


def _check(results, kernel, arch, dtype, d, causal=None):
    rows = [r for r in results if r["kernel"] == kernel and r["arch"] == arch and r["dtype"] == dtype
            and r["head_dim"] == d and (causal is None or r["causal"] == causal)]
    assert rows, f"no default config compiled for {kernel} sm_{arch} {dtype} d={d} causal={causal}"
    for r in rows:
        where = f"{kernel} sm_{arch} {dtype} d={d} causal={r['causal']} [{r['config']}]"
        assert r["shared"] <= SMEM_LIMIT[arch], f"{where}: {r['shared']} B shared memory > {SMEM_LIMIT[arch]}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{where}: {r['spill_stores']}/{r['spill_loads']} B spill stores/loads ({r['registers']} registers)")
        # the report names the instruction shapes of every tensor-core row (wgmma: m64nNk16; mma.sync: m16n8k*)
        assert (r["mma"] == "none") == (r["mma_shapes"] == ""), f"{where}: {r['mma']} / {r['mma_shapes']!r}"
        if r["mma"] == "wgmma":
            assert "m64n" in r["mma_shapes"], f"{where}: {r['mma_shapes']!r}"


_grid = pytest.mark.parametrize("arch,dtype,d", [
    pytest.param(a, t, d, id=f"sm{a}-{t}-d{d}") for a in ARCHS for t in DTYPES for d in HEAD_DIMS
])


@_grid
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_compile_forward(compile_results, arch, dtype, d, causal):
    _check(compile_results, "fwd", arch, dtype, d, causal)


@_grid
def test_compile_forward_inference_variant(compile_results, arch, dtype, d):
    _check(compile_results, "fwd_infer", arch, dtype, d, False)


@_grid
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", ["dkdv", "dq"])
def test_compile_backward(compile_results, kernel, arch, dtype, d, causal):
    _check(compile_results, kernel, arch, dtype, d, causal)


@_grid
def test_compile_backward_preprocess(compile_results, arch, dtype, d):
    _check(compile_results, "bwd_pre", arch, dtype, d)


# Hot paths on Hopper: every kernel with matrix products needs at least one default row that compiles to wgmma
# (warpgroup MMA) without spills, for fp16/bf16, d = 64 and 128, causal and not (dK/dV at d = 128 through its
# two-pass SPLIT row). Losing such a row fails here.


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", ["fwd", "fwd_infer", "dkdv", "dq"])
def test_compile_hopper_wgmma_row(compile_results, kernel, d, causal, dtype):
    if kernel == "fwd_infer" and causal:
        pytest.skip("the inference variant is compiled non-causal only")
    rows = [r for r in compile_results if r["kernel"] == kernel and r["arch"] == 90 and r["dtype"] == dtype
            and r["head_dim"] == d and r["causal"] == causal]
    good = [r["config"] for r in rows if r["mma"] == "wgmma" and r["spill_stores"] == 0
            and r["shared"] <= SMEM_LIMIT[90]]
    assert good, f"{kernel} sm_90 {dtype} d={d} causal={causal}: no spill-free wgmma row among " \
                 f"{[(r['config'], r['mma']) for r in rows]}"
    if kernel.startswith("fwd") and d == 128:
        assert any(int(c.split("BLOCK_M=")[1].split()[0]) >= 64 for c in good), good


def test_compile_report_counts_mma_instruction_shapes():
    """The shape column: every wgmma / mma.sync site of the PTX, by shape, most frequent first."""
    from kernels.compile_check import mma_shapes

    ptx = "\n".join(["wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};"] * 3
                     + ["wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};"] * 5
                     + ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {...};", "wgmma.fence.sync.aligned;"])
    assert mma_shapes(ptx) == "m64n128k16x5 m64n64k16x3 m16n8k16x1"
    assert mma_shapes("fma.rn.f32 %f1, %f2, %f3, %f4;") == ""


# Head-layout variants (kernels.compile_check.VARIANTS: GQA's runtime group size and its dK/dV group loop, the
# "halves" value addressed in two halves, the v2 layout's d-wide value): every row the variant's problems are listed
# for (configs._VARIANT_SPILLS prunes the rows that spill there) compiles within shared memory and without spills.
from kernels.compile_check import VARIANT_DTYPES, VARIANT_HEAD_DIMS, VARIANTS  # noqa: E402


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", VARIANT_DTYPES)
@pytest.mark.parametrize("d", VARIANT_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compile_head_layout_variants(compile_results, variant, kernel, arch, dtype, d, causal):
    _check(compile_results, f"{kernel}_{variant}", arch, dtype, d, causal)
