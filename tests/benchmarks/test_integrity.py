"""The benchmark harness's honesty (issue 25): the baselines users run, compiled code really timed, a backward
check that can fail, profiles that do not double-count, enough samples, host time that knows when it is wrong,
and output that survives a time limit. CPU tests; where the real path needs a GPU, CUDA is simulated."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import bench_diff_attn, bench_model, common, op_case, profile_op, providers, verdicts
from diffclip.backends import combine_outputs
from kernels import diff_attn_reference
from kernels.reference import diff_attn_official

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _FullSizeOps(TorchDispatchMode):
    """Records (op, output dtype) for every op whose output has `numel` elements (a pass over the output)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.ops.append((str(func.overloadpacket.__name__), out.dtype))
        return out


@pytest.mark.parametrize("lam", [0.8, torch.tensor(0.8), torch.tensor([0.3, 0.9])], ids=["float", "0d", "perhead"])
def test_sdpa_combine_is_two_passes_in_the_activation_dtype(lam, monkeypatch):
    """Finding 1: the model's sdpa backend (= the benchmark's sdpa2) combines as timm does: the difference in one
    pass, then one fused RMS norm (input and weight in the activation dtype: what CUDA's fused kernel takes), no
    fp32 copy of the output."""
    import torch.nn.functional as F

    o1, o2 = torch.randn(2, 2, 9, 32).bfloat16(), torch.randn(2, 2, 9, 32).bfloat16()
    w = (torch.rand(32) + 0.5).bfloat16()
    with _FullSizeOps(o1.numel()) as seen:
        plain = combine_outputs(o1, o2, lam, torch.bfloat16)
    assert plain.dtype == torch.bfloat16 and seen.ops in ([("add", torch.bfloat16)], [("addcmul", torch.bfloat16)])
    norms = []
    real_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda x, shape, weight, eps: norms.append((x.dtype, weight.dtype)) or
                        real_norm(x, shape, weight, eps))
    with _FullSizeOps(o1.numel()) as seen:
        out = combine_outputs(o1, o2, lam, torch.bfloat16, w, 1e-5, 0.2)
    assert norms == [(torch.bfloat16, torch.bfloat16)]
    assert seen.ops[0][0] in ("add", "addcmul") and all(dt == torch.bfloat16 for _, dt in seen.ops[:1] + seen.ops[-1:])
    ref = combine_outputs(o1.double(), o2.double(), lam if not isinstance(lam, torch.Tensor) else lam.double(),
                          torch.float64, w.double(), 1e-5, 0.2)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_baselines_users_run_are_providers():
    for name in ("eager-official", "sdpa2", "sdpa2-fp32", "sdpa4", "sdpa2-compile", "sdpa4-compile", "compile"):
        assert name in providers.PROVIDERS
    assert set(bench_diff_attn.DIFFCLIP_PROVIDERS) <= set(providers.PROVIDERS)


def test_official_formulation_is_the_reference_math_in_the_input_dtype():
    """Finding 6: `eager-official` computes the same thing (fp32: to round-off) and keeps the official code's
    low-precision steps (fp16: visibly less exact than the reference, still close)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 33, 16, generator=g), torch.randn(2, 4, 33, 16, generator=g)
    v, w = torch.randn(2, 2, 33, 32, generator=g), torch.rand(32, generator=g) + 0.5
    for causal in (False, True):
        kw = dict(causal=causal, norm_weight=w, out_scale=0.3)
        ref = diff_attn_reference(q.double(), k.double(), v.double(), 0.7, **{**kw, "norm_weight": w.double()})
        torch.testing.assert_close(diff_attn_official(q, k, v, 0.7, **kw).double(), ref, atol=2e-6, rtol=2e-6)
        half = diff_attn_official(q.half(), k.half(), v.half(), 0.7, **kw)
        assert half.dtype == torch.float16
        err = ((half.double() - ref).norm() / ref.norm()).item()
        ours = ((diff_attn_reference(q.half(), k.half(), v.half(), 0.7, **kw).double() - ref).norm() / ref.norm())
        assert ours.item() < err < 1e-2


def test_backward_check_catches_scrambled_dv(monkeypatch):
    """Finding 10: with a constant upstream gradient every column of dV = Pᵀ·dO is the same, so a backward that
    permutes dV's columns passed the check with error 0. A seeded random dO exposes it."""

    class Scrambled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return diff_attn_reference(q, k, v, 0.8)

        @staticmethod
        def backward(ctx, g):
            q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
            with torch.enable_grad():
                dq, dk, dv = torch.autograd.grad(diff_attn_reference(q, k, v, 0.8), (q, k, v), g)
            return dq, dk, dv.flip(-1)

    monkeypatch.setitem(providers.PROVIDERS, "sdpa2", lambda q, k, v, lam, causal=False: Scrambled.apply(q, k, v))
    row = op_case.run_case("sdpa2", "x", 1, 1, 8, 16, False, "fp32", "fwd+bwd", torch.device("cpu"))
    assert row["ms"] is None and row["skipped"].startswith("output check failed"), row


def test_compiled_provider_is_fresh_per_case_and_really_compiled():
    """Finding 2: one compiled object for every case passed Dynamo's recompile limit (8) in a full run and then
    timed eager code. Ten cases of different shapes: every row ran its own compiled graph."""
    rows = [op_case.run_case("sdpa2-compile", "x", 1, 1, n, 16, False, "fp32", "fwd", torch.device("cpu"))
            for n in range(5, 15)]
    assert all(r["ms"] and r["compiled_graphs"] == 1 for r in rows), rows


def test_eager_fallback_is_not_timed():
    """A compiled provider whose graph never runs (Dynamo disabled here, as after the recompile limit) is reported,
    not timed."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        row = op_case.run_case("sdpa2-compile", "x", 1, 1, 8, 16, False, "fp32", "fwd", torch.device("cpu"))
    assert row["ms"] is None and "eager fallback" in row["skipped"], row


def _event(name, device_type, us, annotation=False, start=0):
    from torch.autograd import DeviceType

    return types.SimpleNamespace(key=name, name=name, device_type=getattr(DeviceType, device_type),
                                 self_device_time_total=us, self_cpu_time_total=0 if device_type != "CPU" else 5,
                                 is_user_annotation=annotation, count=1, time_range=types.SimpleNamespace(start=start))


def test_profile_sums_device_kernels_only():
    """Finding 4: the CPU op that launched a kernel carries that kernel's device time too, and user annotations
    span kernels: summing everything counted the same work three times."""
    events = [_event("aten::mm", "CPU", 100), _event("sm90_gemm", "CUDA", 100),
              _event("ProfilerStep#1", "CUDA", 250, annotation=True)]
    got = profile_op.summarize(events, steps=1)
    assert got["gpu_us_per_step"] == 100 and [e["name"] for e in got["top_gpu"]] == ["sm90_gemm"]


def test_per_kernel_time_splits_steps_and_ignores_other_kernels():
    """Finding 3: a sweep row times its kernel alone; the partner kernel of the backward adds nothing."""
    events = []
    for step, (dkdv, dq) in enumerate(((300, 900), (310, 880), (290, 905))):
        events += [_event("_bwd_dkdv_kernel", "CUDA", dkdv, start=10 * step),
                   _event("_bwd_dq_kernel", "CUDA", dq, start=10 * step + 1),
                   _event("_bwd_dkdv_kernel", "CPU", dkdv, start=10 * step)]  # host-side view: not counted
    assert common.per_step_ms(events, "_bwd_dkdv_kernel", 3) == [0.3, 0.31, 0.29]
    with pytest.raises(RuntimeError, match="same number"):
        common.per_step_ms(events, "_bwd_dkdv_kernel", 2)


def test_sweep_kernel_names_exist():
    from benchmarks.sweep import SWEPT
    from kernels import bwd, bwd_fused, fwd

    for _, name in SWEPT.values():
        assert any(hasattr(m, name) for m in (fwd, bwd, bwd_fused)), name


class _FakeCuda:
    """Enough of torch.cuda for the timing helpers' CUDA branches: events that say `done` when queried."""

    def __init__(self, monkeypatch, done):
        class Event:
            def __init__(self, enable_timing=False):
                pass

            def record(self):
                pass

            def query(self):
                return done

            def elapsed_time(self, other):
                return 114.0  # a DiffCLIP training step, ms

        for name, value in (("is_available", lambda: True), ("synchronize", lambda: None),
                            ("_sleep", lambda cycles: None), ("Event", Event)):
            monkeypatch.setattr(torch.cuda, name, value)


def test_bench_times_at_least_ten_runs_of_a_slow_step(monkeypatch):
    """Finding 5: do_bench(rep=100) timed one run of a 114 ms training step. `bench` raises the budget."""
    import triton.testing

    _FakeCuda(monkeypatch, done=True)
    seen = {}

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        seen["n"] = max(1, int(rep / 114.0))  # what do_bench does with its own estimate
        assert return_mode == "all"
        return [114.0 + i % 3 for i in range(seen["n"])]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    t = common.bench(lambda: None)
    assert seen["n"] >= common.MIN_SAMPLES and t["n"] == seen["n"]
    assert t["ms_min"] == 114.0 and t["ms_max"] == 116.0 and t["ms"] == pytest.approx(115.0)


def test_host_ms_resets_grads_and_refuses_a_drained_queue(monkeypatch):
    """Finding 9: host_ms now resets gradients like `bench`, and returns None when the GPU's sleep ended before
    the calls did (a call waited on the device, or the launch queue filled)."""
    x = torch.zeros(3, requires_grad=True)

    def fn():
        assert x.grad is None, "gradient not reset between calls"
        (x * 2).sum().backward()

    _FakeCuda(monkeypatch, done=False)
    assert common.host_ms(fn, calls=3, grad_to_none=[x]) > 0
    _FakeCuda(monkeypatch, done=True)
    assert common.host_ms(fn, calls=3, grad_to_none=[x]) is None


def test_speedups_name_the_fastest_baseline_and_flag_noise():
    def row(p, ms, lo, hi):
        return dict(provider=p, ms=ms, ms_min=lo, ms_max=hi, shape="s", B=1, H=1, N=1, d=16, causal=False,
                    dtype="bf16", mode="fwd")

    rows = verdicts.add_speedups([row("triton", 1.0, 0.95, 1.05), row("sdpa2", 1.3, 1.2, 1.4),
                                  row("sdpa2-compile", 1.02, 1.0, 1.1)])
    ours = rows[0]
    assert ours["best_baseline"] == "sdpa2-compile" and ours["speedup_vs_best"] == pytest.approx(1.02)
    assert ours["vs_best_noise"] is True and ours["speedup_vs"]["sdpa2"] == pytest.approx(1.3)


def test_interrupted_run_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """Finding 7: the JSON was written only at the end, so a step killed by its time limit lost every row."""
    out = tmp_path / "op.json"
    calls = []

    def fake_run_case(prov, *args):
        calls.append(prov)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what `timeout -s INT` delivers
        return dict(provider=prov, shape=args[0], B=args[1], H=args[2], N=args[3], d=args[4], causal=args[5],
                    dtype=args[6], mode=args[7], ms=1.0, ms_min=1.0, ms_max=1.0, n=10, tflops=1.0, skipped=None)

    monkeypatch.setattr(op_case, "run_case", fake_run_case)
    assert bench_diff_attn.main(["--smoke", "--modes", "fwd", "--providers", "triton,sdpa2",
                                 "--json", str(out)]) == 130
    data = json.loads(out.read_text())
    assert data["interrupted"] and [r["provider"] for r in data["rows"]] == ["triton", "sdpa2"]


def test_device_check_script_survives_its_limits():
    """Finding 7: SIGINT limits (pytest prints its summary, benchmarks save), no early-closing pipes, benchmarks
    before tests."""
    text = open(os.path.join(ROOT, "benchmarks", "device_check.sh")).read()
    code = [line.split("#")[0] for line in text.splitlines()]
    timeouts = [line for line in code if "timeout " in line]
    assert timeouts and all("timeout -s INT" in line for line in timeouts), timeouts
    assert not any("| head" in line for line in code)
    assert text.index("benchmarks.bench_diff_attn") < text.index("-m pytest")
    assert text.index("benchmarks.bench_model") < text.index("-m pytest")


def test_per_test_time_limit(tmp_path):
    """device_check's DIFFCLIP_TEST_TIMEOUT_S fails a hung test alone (tests/conftest.py), no plugin needed."""
    test_dir = tmp_path / "t"
    test_dir.mkdir()
    (test_dir / "conftest.py").write_text(open(os.path.join(ROOT, "tests", "conftest.py")).read())
    (test_dir / "test_sleep.py").write_text("import time\n\ndef test_hangs():\n    time.sleep(30)\n\n"
                                            "def test_fine():\n    pass\n")
    env = dict(os.environ, DIFFCLIP_TEST_TIMEOUT_S="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_dir)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 1 and "1 failed, 1 passed" in proc.stdout, proc.stdout[-2000:]
    assert "ran past DIFFCLIP_TEST_TIMEOUT_S=1" in proc.stdout


def test_model_compile_rows_check_the_compiled_callable(monkeypatch):
    """Finding 11: the +compile rows checked the uncompiled model. A compiled callable that computes something
    else must fail the row's check."""
    from benchmarks.plain_clip import plain_clip
    from diffclip import DiffCLIP

    class Wrong(providers.Compiled):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            return out * 2 if isinstance(out, torch.Tensor) else {k: v * 2 for k, v in out.items()}

    monkeypatch.setattr(providers, "Compiled", Wrong)
    config = bench_model.smoke_config()
    base, plain = DiffCLIP(config, attn_backend="eager").eval(), plain_clip(config).eval()
    row = bench_model.run_row("sdpa+compile", "encode_image", 2, base, plain, config, torch.device("cpu"),
                              torch.float32)
    assert row["ms"] is None and row["skipped"].startswith("embedding check"), row


def test_sweep_gives_no_time_to_a_config_that_fails_the_check(monkeypatch):
    """A sweep row is checked against the reference before it is timed, like a provider row."""
    from benchmarks import sweep

    monkeypatch.setattr(op_case, "check", lambda *args, **kwargs: 1.0)  # every forced config computes garbage
    rows = sweep.run_sweep(sweep.SMOKE, "fp32", torch.device("cpu"))
    assert rows and all(r["ms"] is None and r["skipped"].startswith("RuntimeError: output check failed")
                        for r in rows), rows


def test_warm_cache_covers_every_triton_case_of_the_device_plan():
    """device_check compiles the plan's kernels in parallel before timing (the first run spent its op budget
    compiling): every shape of the plan, with each backward form the plan times."""
    from benchmarks import warm_cache

    todo = warm_cache.tasks(smoke=False)
    for shape, _, providers_ in bench_diff_attn.DEVICE_CHECK:
        forms = {"separate"} | {p.removeprefix("triton-bwd-") for p in providers_ if p.startswith("triton-bwd-")}
        assert {t[-1] for t in todo if t[:6] == shape} == forms, shape
