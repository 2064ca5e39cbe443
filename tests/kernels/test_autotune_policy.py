"""The launch policy of kernels/configs.py: fixed configs (the measured winner, else the first fitting row), forced
configs, and autotuning recorded per key — one choice shared by the training and the inference forward, keyed by
the GPU architecture, never benchmarked while a CUDA graph is being captured (issue 20, items 3-6).

CPU tests drive `configs.launch` with a fake autotuner, or Triton's real autotuner with its benchmark stubbed (the
interpreter cannot time anything); the GPU tests capture and compare for real."""

import pytest
import torch
from cases import make_qkv, to64
from conftest import DEVICE
from tolerances import FWD, assert_close

triton = pytest.importorskip("triton")

from kernels import configs, diff_attn, diff_attn_reference, fwd  # noqa: E402

KEYS = ["N_BUCKET", "GRID_BUCKET", "HEAD_DIM", "CAUSAL", "ARCH"]
P90 = configs.Problem(64, 2, False, 197, 90)
P80 = configs.Problem(64, 2, False, 197, 80)
Q16 = torch.empty(0, dtype=torch.float16)


class FakeTuner:
    """Records how `configs.launch` launched: through the autotuner (which picks `choice`), or straight to the jit
    function with a config's kwargs."""

    arg_names = ["Q", "N_BUCKET", "GRID_BUCKET"]
    keys = KEYS

    def __init__(self, choice=None):
        self.calls = []
        self.best_config = choice or configs.ROWS["fwd"][1].config()
        outer = self

        class _Fn:
            def __getitem__(self, grid):
                return lambda *a, **kw: outer.calls.append(("direct", kw))

        self.fn = _Fn()

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append(("autotuned", kw))


def call(tuner, kernel="fwd", p=P90, grid_bucket=64, **flags):
    kwargs = dict(HEAD_DIM=p.head_dim, CAUSAL=p.causal, ARCH=p.sm, **flags)
    return configs.launch(kernel, tuner, None, (Q16, 256, grid_bucket), kwargs, p)


@pytest.fixture
def autotuning_on(monkeypatch):
    monkeypatch.setenv("DIFF_ATTN_AUTOTUNE", "1")
    monkeypatch.delenv("DIFF_ATTN_DETERMINISTIC", raising=False)
    monkeypatch.setattr(configs, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(configs, "_TUNED", {k: {} for k in configs.KERNELS})  # a fresh record per test


def test_launch_autotunes_once_per_key_then_launches_the_choice(autotuning_on):
    tuner = FakeTuner()
    assert call(tuner) is tuner.best_config
    assert call(tuner) is tuner.best_config
    assert call(tuner, grid_bucket=512) is tuner.best_config  # a new launch size is a new key
    assert [c[0] for c in tuner.calls] == ["autotuned", "direct", "autotuned"]
    assert tuner.calls[1][1] == {**dict(HEAD_DIM=64, CAUSAL=False, ARCH=90), **tuner.best_config.all_kwargs()}


@pytest.mark.parametrize("how", ["torch", "env", "no-autotune"])
def test_deterministic_mode_uses_the_fixed_row(autotuning_on, monkeypatch, how):
    if how == "torch":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    elif how == "env":
        monkeypatch.setenv("DIFF_ATTN_DETERMINISTIC", "1")
    else:
        monkeypatch.setenv("DIFF_ATTN_AUTOTUNE", "0")
    for kernel in configs.KERNELS:
        tuner = FakeTuner()
        cfg = call(tuner, kernel)
        want = configs.fixed_config(kernel, P90)
        assert cfg.all_kwargs() == want.all_kwargs()
        assert tuner.calls == [("direct", dict(HEAD_DIM=64, CAUSAL=False, ARCH=90, **want.all_kwargs()))]


def _key(cfg):
    return configs.config_key(cfg)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fixed_row_is_the_measured_winner_else_the_first_fitting(autotuning_on, causal):
    """Issue 20, item 3: the fixed rows were each list's first, which the H200 sweep measured slowest among the
    backward rows at the vision shape. Now: the measured winner where one exists (sm_90, d = 64, 16-bit), else
    the first fitting row (sm_80, d = 128: no measurement), and never a row that does not fit the problem."""
    expected = {"fwd": (128, 32, 8, 2, None), "dkdv": (32, 32, 4, 2, False), "dq": (64, 32, 4, 2, None)}
    for kernel, want in expected.items():
        assert configs.MEASURED_WINNERS[(kernel, 90, 64, 2)] == want
        assert _key(configs.fixed_config(kernel, configs.Problem(64, 2, causal, 197, 90))) == want
        for other in (configs.Problem(64, 2, causal, 197, 80), configs.Problem(128, 2, causal, 197, 90),
                      configs.Problem(64, 4, causal, 197, 90)):
            assert _key(configs.fixed_config(kernel, other)) == configs.fitting_rows(kernel, other)[0].key, other
    short = configs.Problem(64, 2, causal, 64, 90)  # a 128-row forward block does not fit N <= 64
    assert _key(configs.fixed_config("fwd", short)) == configs.fitting_rows("fwd", short)[0].key != expected["fwd"]


def test_forced_config_wins_and_is_restored(autotuning_on):
    forced = configs.ROWS["dq"][-1].config()
    tuner = FakeTuner()
    with configs.force_configs(dq=forced):
        assert call(tuner, "dq") is forced
    assert call(tuner, "dq") is tuner.best_config
    assert [c[0] for c in tuner.calls] == ["direct", "autotuned"]


@pytest.mark.parametrize("first", [True, False], ids=["training_first", "inference_first"])
def test_training_and_inference_forwards_share_one_choice(autotuning_on, first):
    """Issue 20, item 5: SAVE_FOR_BWD is not part of the key; whichever forward runs first tunes, the other
    launches its choice."""
    assert "SAVE_FOR_BWD" not in fwd._diff_attn_fwd.keys
    tuner = FakeTuner()
    a = call(tuner, SAVE_FOR_BWD=first)
    b = call(tuner, SAVE_FOR_BWD=not first)
    assert a is b and [c[0] for c in tuner.calls] == ["autotuned", "direct"]


def test_each_architecture_is_tuned_on_its_own(autotuning_on):
    """Issue 20, item 6: the same problem on an sm_90 and an sm_80 GPU are two keys."""
    hopper = configs.ROWS["fwd"][0].config()  # min_sm 90
    tuner = FakeTuner(hopper)
    call(tuner, p=P90)
    tuner.best_config = configs.ROWS["fwd"][1].config()
    assert call(tuner, p=P80) is tuner.best_config
    assert [c[0] for c in tuner.calls] == ["autotuned", "autotuned"]


def test_no_autotuning_while_a_cuda_graph_is_captured(autotuning_on, monkeypatch):
    """Issue 20, item 4: a key never tuned is launched with the nearest tuned key's choice (else the fixed row)
    while the stream is capturing — autotuning would benchmark and synchronise there — with a warning; the record
    is left for a launch outside the capture to tune."""
    a, b = configs.ROWS["fwd"][1].config(), configs.ROWS["fwd"][2].config()
    tuner = FakeTuner(a)
    call(tuner, grid_bucket=64)
    tuner.best_config = b
    call(tuner, grid_bucket=1024)
    monkeypatch.setattr(configs, "stream_capturing", lambda device: True)
    with pytest.warns(RuntimeWarning, match="CUDA graph is being captured.*GRID_BUCKET=1024"):
        assert call(tuner, grid_bucket=512) is b  # 2^9: one power of two from 2^10, three from 2^6
    with pytest.warns(RuntimeWarning, match="GRID_BUCKET=64"):
        assert call(tuner, grid_bucket=128) is a
    with pytest.warns(RuntimeWarning, match="fixed config"):  # nothing tuned for this problem: the fixed row
        cfg = call(tuner, p=configs.Problem(64, 2, True, 197, 90), grid_bucket=128)
    assert cfg.all_kwargs() == configs.fixed_config("fwd", configs.Problem(64, 2, True, 197, 90)).all_kwargs()
    assert [c[0] for c in tuner.calls] == ["autotuned", "autotuned", "direct", "direct", "direct"]
    monkeypatch.setattr(configs, "stream_capturing", lambda device: False)
    call(tuner, grid_bucket=512)
    assert tuner.calls[-1][0] == "autotuned"


# Triton's real autotuner, its benchmark stubbed: the interpreter cannot time, and the point is which key it
# tunes and which choice each launch gets.
INTERP_A = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)
INTERP_B = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def _real_tuner(monkeypatch, candidates, bench):
    tuner = triton.autotune(configs=candidates, key=fwd._diff_attn_fwd.keys,
                            prune_configs_by={"early_config_prune": configs.PRUNE["fwd"]})(fwd._diff_attn_fwd_kernel)
    timed = []
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **kw: timed.append(config) or bench(config, kw))
    monkeypatch.setattr(fwd, "_diff_attn_fwd", tuner)
    return tuner, timed


def test_real_autotuner_training_and_inference_forwards_give_the_same_bits(autotuning_on, monkeypatch):
    """Issue 20, item 5, through Triton's autotuner: a benchmark that prefers another block with and without the
    saved state must not make the two forwards differ (they did: two keys, two choices, other bits)."""
    _real_tuner(monkeypatch, [INTERP_A, INTERP_B],
                lambda cfg, kw: 1.0 if (cfg is INTERP_A) == kw["SAVE_FOR_BWD"] else 2.0)
    q, k, v = make_qkv(1, 2, 100, 16, torch.float32, DEVICE)
    with torch.no_grad():
        inference = diff_attn(q, k, v, 0.7, causal=True)
    chosen = configs.LAST_CONFIG["fwd"]
    q.requires_grad_(True)
    training = diff_attn(q, k, v, 0.7, causal=True)
    assert configs.LAST_CONFIG["fwd"] is chosen
    assert torch.equal(training, inference)


@pytest.mark.skipif(DEVICE == "cuda", reason="simulates the architectures; the H200 has only one")
def test_real_autotuner_does_not_reuse_a_hopper_row_on_ampere(autotuning_on, monkeypatch):
    """Issue 20, item 6: the tuned sm_90 choice (a Hopper-only row) was reused for the same problem on sm_80."""
    hopper = configs.ROWS["fwd"][0]
    assert hopper.min_sm == 90 and 64 in hopper.head_dims
    _real_tuner(monkeypatch, [INTERP_A, hopper.config()], lambda cfg, kw: 1.0 if cfg.kwargs["BLOCK_M"] == 128 else 2.0)
    q, k, v = make_qkv(1, 1, 72, 64, torch.float16, DEVICE)
    ref = diff_attn_reference(to64(q), to64(k), to64(v), 0.7)
    for sm in (90, 80):
        monkeypatch.setattr(fwd, "device_sm", lambda device, sm=sm: sm)
        out = diff_attn(q, k, v, 0.7)
        row = configs.row_of("fwd", configs.LAST_CONFIG["fwd"])
        assert (row is hopper) == (sm == 90), (sm, configs.LAST_CONFIG["fwd"])
        assert_close(out, ref, torch.float16, FWD, f"sm_{sm}")


def test_real_autotuner_never_benchmarks_during_capture(autotuning_on, monkeypatch):
    """Issue 20, item 4, through Triton's autotuner: at a batch size never seen, a (simulated) capture launches
    the nearest tuned choice and times nothing."""
    tuner, timed = _real_tuner(monkeypatch, [INTERP_A, INTERP_B], lambda cfg, kw: 1.0 if cfg is INTERP_B else 2.0)
    q, k, v = make_qkv(1, 1, 40, 16, torch.float32, DEVICE)
    diff_attn(q, k, v, 0.5)
    assert timed == [INTERP_A, INTERP_B]
    q, k, v = make_qkv(8, 1, 40, 16, torch.float32, DEVICE)  # another GRID_BUCKET
    monkeypatch.setattr(configs, "stream_capturing", lambda device: True)
    with pytest.warns(RuntimeWarning, match="CUDA graph"):
        out = diff_attn(q, k, v, 0.5)
    assert timed == [INTERP_A, INTERP_B] and configs.LAST_CONFIG["fwd"] is INTERP_B
    assert_close(out, diff_attn_reference(to64(q), to64(k), to64(v), 0.5), torch.float32, FWD, "captured")


def _gpu_inputs(B, N=197, seed=0):
    q, k, v = make_qkv(B, 6, N, 64, torch.bfloat16, "cuda", "linear", requires_grad=True, seed=seed)
    return [q, k, v, torch.tensor(0.8, device="cuda", requires_grad=True)]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_capture_at_unseen_batch_autotunes_nothing_and_replays(monkeypatch):
    """Autotuning on: forward+backward tuned at B=2, then captured at B=16 (a new GRID_BUCKET). The capture must
    succeed (no benchmark, no sync inside it) and its replay equal an eager run with the configs it launched."""
    monkeypatch.setenv("DIFF_ATTN_AUTOTUNE", "1")
    monkeypatch.delenv("DIFF_ATTN_DETERMINISTIC", raising=False)
    monkeypatch.setattr(configs, "_TUNED", {k: {} for k in configs.KERNELS})

    def step(leaves):
        out = diff_attn(*leaves, causal=False)
        out.float().square().mean().backward()
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(_gpu_inputs(2))  # tunes and compiles at B=2 only
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    leaves = _gpu_inputs(16, seed=1)
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(RuntimeWarning, match="CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            static_out = step(leaves)
    used = {k: configs.LAST_CONFIG[k] for k in configs.KERNELS}
    assert not any(key[1] == configs.grid_bucket(16, 6, 197) for key in configs._TUNED["fwd"])  # nothing recorded
    graph.replay()  # the leaves' .grad are the graph's own tensors (allocated during the capture)
    torch.cuda.synchronize()
    replayed = [static_out.clone()] + [t.grad.clone() for t in leaves]
    eager = _gpu_inputs(16, seed=1)
    with configs.force_configs(**used):
        out = step(eager)
    for a, b in zip(replayed, [out] + [t.grad for t in eager]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="autotuning runs on CUDA only")
@pytest.mark.parametrize("training_first", [False, True], ids=["inference_first", "training_first"])
def test_same_bits_with_and_without_saved_state(monkeypatch, training_first):
    """Autotuning on, a shape never tuned: the forward that saves state for backward and the one that does not
    give the same bits, whichever runs (and tunes) first (activation checkpointing relies on it)."""
    monkeypatch.setenv("DIFF_ATTN_AUTOTUNE", "1")
    monkeypatch.delenv("DIFF_ATTN_DETERMINISTIC", raising=False)
    monkeypatch.setattr(configs, "_TUNED", {k: {} for k in configs.KERNELS})
    q, k, v, lam = _gpu_inputs(3, N=300 + training_first)
    outs = {}
    for grad in (training_first, not training_first):
        with torch.set_grad_enabled(grad):
            outs[grad] = diff_attn(q, k, v, lam, causal=True)
    assert outs[True].grad_fn is not None and outs[False].grad_fn is None
    assert torch.equal(outs[True], outs[False])
