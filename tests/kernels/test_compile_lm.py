"""GPU compile check of the language-model kernels, on any machine: every config of kernels/configs_lm.py (varlen
forward, its inference variant, varlen dK/dV and dQ, decode split at each BLOCK_M it can pick, with and without
cache_leftpad, decode combine) is compiled ahead of time for sm_80 and sm_90 (fp16, bf16, fp32; d = 16, 32, 64,
128). Shared memory must fit and ptxas must report no spills. Runs `python -m kernels.compile_check_lm --json` once, without TRITON_INTERPRET; with
DIFF_ATTN_TRITON36=/path (a folder with Triton 3.6 side-installed: `pip install --target DIR --no-deps triton==3.6.0`) the same check also runs on it.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.aot

from kernels.compile_check import SMEM_LIMIT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRITONS = ["installed"] + (["3.6"] if os.environ.get("DIFF_ATTN_TRITON36") else [])
KERNELS = ["varlen_fwd", "varlen_fwd_infer", "varlen_dkdv", "varlen_dq", "decode_split", "decode_split_leftpad",
           "decode_combine"]


@pytest.fixture(scope="session", params=TRITONS)
def lm_compile_results(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_lm") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if request.param == "3.6":
        env["PYTHONPATH"] = os.pathsep.join([os.environ["DIFF_ATTN_TRITON36"], ROOT])
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check_lm", "--json", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"ahead-of-time compilation failed:\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_compile_lm_kernels_without_spills(lm_compile_results, kernel, arch, dtype):
    rows = [r for r in lm_compile_results["rows"] if r["kernel"] == kernel and r["arch"] == arch
            and r["dtype"] == dtype]
    got = {r["head_dim"] for r in rows}
    assert got == {16, 32, 64, 128}, f"{kernel} sm_{arch} {dtype}: compiled only for d in {sorted(got)}"
    for r in rows:
        where = (f"{kernel} sm_{arch} {dtype} d={r['head_dim']} causal={r['causal']} [{r['config']}] "
                 f"triton {lm_compile_results['triton']}")
        assert r["shared"] <= SMEM_LIMIT[arch], f"{where}: {r['shared']} B shared memory"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{where}: {r['spill_stores']}/{r['spill_loads']} B spill stores/loads ({r['registers']} registers)")
