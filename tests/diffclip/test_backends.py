"""Backend selection: registry names, precedence (argument > $DIFFCLIP_ATTN_BACKEND > auto), clear errors."""

import os
import subprocess
import sys

import pytest
import torch
from tiny import TINY

from diffclip import DiffCLIP, backends



def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        DiffCLIP(TINY, attn_backend="flash")
    for name in ("eager", "sdpa", "triton", "auto"):
        assert name in str(info.value)


def test_argument_beats_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "eager")
    assert DiffCLIP(TINY, attn_backend="sdpa").attn_backend == "sdpa"
    assert DiffCLIP(TINY).attn_backend == "eager"
    monkeypatch.delenv(backends.ENV_VAR)
    assert DiffCLIP(TINY).attn_backend == "auto"


def test_bad_env_value_is_named(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        DiffCLIP(TINY)


def test_set_attn_backend_reaches_every_layer():
    model = DiffCLIP(TINY, attn_backend="eager").set_attn_backend("sdpa")
    layers = [m for m in model.modules() if type(m).__name__ == "DiffAttention"]
    assert len(layers) == 2 and all(m.backend == "sdpa" for m in layers)


def test_auto_resolves_to_sdpa_on_cpu():
    assert backends.resolve("auto", torch.device("cpu"), 64, torch.float32) == "sdpa"


def test_explicit_triton_on_cpu_without_interpreter_raises():
    """No silent fallback: 'triton' on CPU tensors outside the interpreter raises RuntimeError saying why."""
    code = (
        "import torch\nfrom diffclip import DiffCLIP, DiffCLIPConfig\n"
        "cfg = DiffCLIPConfig(embed_dim=16, vision_width=32, vision_img_size=32, vision_patch_size=16, "
        "vision_depth=1, vision_heads=2, vocab_size=50, context_length=8, text_width=32, text_heads=2, "
        "text_layers=1)\n"
        "m = DiffCLIP(cfg, attn_backend='triton')\n"
        "try:\n    m.encode_image(torch.randn(1, 3, 32, 32))\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.startswith("ERR attention backend 'triton' cannot run here"), out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def test_triton_missing_is_a_runtime_error(monkeypatch):
    monkeypatch.setattr("kernels.triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        DiffCLIP(TINY, attn_backend="triton")


def test_sdpa_backend_matches_reference_for_every_lambda_kind():
    from kernels import diff_attn_reference

    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    v = torch.randn(2, 2, 9, 32)
    w = torch.rand(32) + 0.5
    for lam in (0.3, torch.tensor(0.3), torch.tensor([0.2, 0.9]), torch.rand(2, 2, 9)):
        for causal in (False, True):
            a = backends.sdpa_diff_attn(q, k, v, lam, causal=causal, norm_weight=w, out_scale=0.2)
            b = diff_attn_reference(q, k, v, lam, causal=causal, norm_weight=w, out_scale=0.2)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_triton_backend_gets_projection_views_and_fused_norm(monkeypatch):
    """No copies between the projections and the kernel; the norm epilogue is handed to the kernel."""
    seen = {}
    fn, reason = backends.BACKENDS["triton"]

    def spy(q, k, v, lam, **kw):
        seen.update(q_stride=q.stride(), v_stride=v.stride(), norm=kw["norm_weight"] is not None,
                    out_scale=kw["out_scale"])
        return fn(q, k, v, lam, **kw)

    monkeypatch.setitem(backends.BACKENDS, "triton", (spy, reason))
    model = DiffCLIP(TINY, attn_backend="triton")
    model.encode_image(torch.randn(1, 3, 32, 32))
    N, C, d = 5, 32, 16  # 4 patches + class token; width 32; 2 heads of 16; rows of the packed q|k|v projection
    assert seen["q_stride"] == (N * 3 * C, d, 3 * C, 1) and seen["v_stride"] == (N * 3 * C, 2 * d, 3 * C, 1)
    assert seen["norm"] and seen["out_scale"] == pytest.approx(1 - TINY.lambda_init)


def test_auto_picks_triton_only_where_it_is_fast(monkeypatch):
    monkeypatch.setattr(backends, "_triton_reason", lambda device: None)
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda, 64, torch.bfloat16) == "triton"
    assert backends.resolve("auto", cuda, 64, torch.float16) == "triton"
    assert backends.resolve("auto", cuda, 64, torch.float32) == "sdpa"  # the kernel's fp32 path is exact, not fast
    assert backends.resolve("auto", cuda, 96, torch.bfloat16) == "sdpa"  # unsupported head dim
