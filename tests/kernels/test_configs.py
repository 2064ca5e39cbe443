"""The autotune lists: configs survive Triton's on-disk autotune cache, the autotune keys hold every flag, the
launch size and the architecture, forced configs, launches go to q's GPU. The launch policy (fixed rows, the
autotune record, CUDA-graph capture) is tested in test_autotune_policy.py."""

import json

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels import bwd, configs, fwd  # noqa: E402
from kernels.runtime import device_guard  # noqa: E402

AUTOTUNED = {"fwd": fwd._diff_attn_fwd, "dkdv": bwd._bwd_dkdv, "dq": bwd._bwd_dq}


@pytest.mark.parametrize("kernel", configs.KERNELS)
def test_every_config_survives_the_autotune_disk_cache(kernel):
    """TRITON_CACHE_AUTOTUNING=1 writes json.dumps(config.__dict__) and rebuilds Config(**d): a config must carry
    only Config fields, and the rebuilt one must map back to the same row."""
    for row in configs.ROWS[kernel]:
        cfg = row.config()
        rebuilt = triton.Config(**json.loads(json.dumps(cfg.__dict__)))
        assert rebuilt.all_kwargs() == cfg.all_kwargs()
        assert configs.row_of(kernel, rebuilt) is row
    interp = configs.INTERPRET[kernel]
    assert triton.Config(**json.loads(json.dumps(interp.__dict__))).all_kwargs() == interp.all_kwargs()


@pytest.mark.parametrize("kernel", configs.KERNELS)
def test_autotune_key_names_are_kernel_arguments(kernel):
    """Triton silently drops key names that are not call arguments (e.g. flags set by @triton.heuristics)."""
    tuner = AUTOTUNED[kernel]
    assert set(tuner.keys) <= set(tuner.arg_names), set(tuner.keys) - set(tuner.arg_names)
    assert {"N_BUCKET", "GRID_BUCKET", "HEAD_DIM", "CAUSAL", "ARCH"} <= set(tuner.keys)
    # the head layouts' flags change the compiled kernel (V_WIDTH, SHARED_K: v2; V_SPLIT: halves; GQA: dK/dV)
    assert {"V_WIDTH", "SHARED_K", "V_SPLIT"} <= set(tuner.keys)
    if kernel == "dkdv":
        assert "GQA" in tuner.keys
    if kernel == "fwd":
        assert "HAS_NORM" in tuner.keys
        # Training and inference forwards share one choice (tests/kernels/test_autotune_policy.py)
        assert "SAVE_FOR_BWD" not in tuner.keys


def test_grid_bucket_separates_small_and_large_batches():
    assert configs.grid_bucket(1, 6, 197) != configs.grid_bucket(256, 6, 197)
    assert configs.grid_bucket(1, 1, 1) == 1
    assert configs.grid_bucket(4096, 16, 4096) == 4096  # capped


def test_every_kernel_has_a_row_for_every_problem_class():
    for kernel in configs.KERNELS:
        for d in (16, 32, 64, 128):
            for nbytes in (2, 4):
                for sm in (80, 90):
                    for causal in (False, True):
                        p = configs.Problem(d, nbytes, causal, 197, sm)
                        assert configs.fitting_rows(kernel, p), p


@pytest.mark.parametrize("gqa,v2,split", [(True, False, False), (False, True, False), (True, True, False),
                                          (False, False, True), (True, False, True)],
                         ids=["gqa", "v2", "v2gqa", "halves", "halvesgqa"])
def test_every_kernel_has_a_row_for_every_head_layout_problem(gqa, v2, split, monkeypatch):
    """Pruning the rows that spill in a head-layout variant (configs._VARIANT_SPILLS) leaves every class a row (the
    one-launch forms may have none: a backward asked for that form then runs the separate form, with a warning)."""
    monkeypatch.setattr(configs, "interpreter_enabled", lambda: False)  # as on a GPU: rows decide the form
    monkeypatch.delenv("DIFF_ATTN_DETERMINISTIC", raising=False)
    for kernel in configs.ALL_KERNELS:
        for d in (16, 32, 64, 128):
            for nbytes in (2, 4):
                for sm in (80, 90):
                    for causal in (False, True):
                        for n in (197, 4096):
                            p = configs.Problem(d, nbytes, causal, n, sm, gqa, v2, split)
                            if kernel in ("fused", "atomic"):
                                monkeypatch.setenv("DIFF_ATTN_BWD", kernel)
                                if configs.fitting_rows(kernel, p):
                                    assert configs.bwd_form(p) == kernel, p
                                else:
                                    with pytest.warns(RuntimeWarning, match=f"DIFF_ATTN_BWD={kernel}"):
                                        assert configs.bwd_form(p) == "separate", p
                                continue
                            assert configs.fitting_rows(kernel, p), (kernel, p)


def test_autotuning_times_at_most_five_candidates_per_kernel():
    """The README promises a first call times at most 5 configs per kernel."""
    counts = [len(configs.fitting_rows(k, configs.Problem(d, b, c, 4096, sm))) for k in configs.KERNELS
              for d in (16, 32, 64, 128) for b in (2, 4) for c in (False, True) for sm in (80, 90)]
    assert max(counts) <= 5


def test_causal_forward_rows_are_block_aligned():
    p = configs.Problem(64, 2, True, 4096, 90)
    for row in configs.fitting_rows("fwd", p):
        assert row.block_m % row.block_n == 0, row


def test_forced_dkdv_config_without_split_runs_the_one_pass_form():
    """Issue 20, item 7: a dK/dV config without SPLIT (the kernel's flag had no default) raised TypeError; SPLIT now
    defaults to off, so it runs the one-pass form: the same gradients as with SPLIT=False spelled out."""
    from cases import make_qkv
    from conftest import DEVICE

    from kernels import diff_attn

    grads = []
    for kwargs in ({"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT": False}, {"BLOCK_M": 16, "BLOCK_N": 32}):
        q, k, v = make_qkv(1, 1, 40, 16, torch.float32, DEVICE, requires_grad=True)
        with configs.force_configs(dkdv=triton.Config(kwargs, num_warps=4, num_stages=1)):
            diff_attn(q, k, v, 0.5, causal=True).square().sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_force_configs_rejects_unknown_kernels():
    with pytest.raises(ValueError, match="unknown kernel"):
        with configs.force_configs(bwd=configs.INTERPRET["dq"]):
            pass


def test_device_guard_targets_the_tensors_device():
    guard = device_guard(torch.device("cuda", 1))  # built, not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with device_guard(torch.device("cpu")):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_second_gpu_while_first_is_current():
    from cases import make_qkv

    from kernels import diff_attn, diff_attn_reference

    torch.cuda.set_device(0)
    q, k, v = make_qkv(2, 3, 197, 64, torch.float16, "cuda:1", requires_grad=True)
    out = diff_attn(q, k, v, 0.5, causal=True)
    ref = diff_attn_reference(q.float(), k.float(), v.float(), 0.5, causal=True)
    assert out.device == torch.device("cuda", 1)
    assert (out.float() - ref).abs().max().item() < 2e-2
    out.sum().backward()
    assert q.grad.device == torch.device("cuda", 1) and torch.isfinite(q.grad).all()


_CACHE_SCRIPT = """
import torch
from kernels import diff_attn
q = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn_like(q, requires_grad=True)
v = torch.randn(2, 2, 300, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.ones(128, device="cuda", requires_grad=True)
diff_attn(q, k, v, 0.5, causal=True, norm_weight=w).sum().backward()
torch.cuda.synchronize()
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning (and its disk cache) runs on CUDA only")
def test_autotuning_with_the_disk_cache(tmp_path):
    """TRITON_CACHE_AUTOTUNING=1: the first process writes the cache, the second reads it back."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="1", DIFF_ATTN_AUTOTUNE="1", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=root)
    env.pop("DIFF_ATTN_DETERMINISTIC", None)
    for attempt in ("write", "read"):
        proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "ok" in proc.stdout, f"{attempt}: {proc.stderr[-3000:]}"
    assert list(tmp_path.rglob("*.autotune.json")), "no autotune cache file written"
