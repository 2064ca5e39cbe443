"""`kernels.integrations.transformers.use_diff_attn` on a tiny random DiffLlama (local config, no download, fp32),
against transformers' own eager attention on a deep copy of the same model: logits (unpadded, right- and
left-padded, prefill onto a cache, decode steps), greedy generation with the KV cache, training gradients, the
refusals, switching back. The kernels run under Triton's interpreter here (tests/conftest.py)."""

import copy
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DiffLlamaConfig, DiffLlamaForCausalLM  # noqa: E402

import kernels.integrations.transformers as hf  # noqa: E402
from conftest import DEVICE  # noqa: E402
from tolerances import BWD, FWD, assert_close_lowp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 128


def tiny_config(kv_heads=2, heads=4, **overrides):
    """`heads` query heads (heads/2 diff-heads) of d = 16 and `kv_heads` key/value heads (kv_heads/2 groups)."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
              num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64, attn_implementation="eager",
              bos_token_id=None, eos_token_id=None, pad_token_id=0)
    kw.update(overrides)
    return DiffLlamaConfig(**kw)


def tiny_pair(kv_heads=2, seed=0, heads=4, **overrides):
    """(eager reference, switched copy) with the same weights. The λ parameters get a larger spread than the default
    init so that λ varies per layer and their gradients are not all alike."""
    torch.manual_seed(seed)
    ref = DiffLlamaForCausalLM(tiny_config(kv_heads, heads, **overrides)).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, hf.DiffLlamaAttention):
                for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2):
                    p.normal_(0, 0.3)
    return ref, hf.use_diff_attn(copy.deepcopy(ref))


# (query heads, kv heads): diff-heads H, groups Hkv, ratio G = H / Hkv. (4, 2): one group, G = 2; (4, 4): two groups,
# G = 1; (8, 4): two groups of G = 2 (map 2 reads key head g + Hkv with g > 0 and a ratio > 1).
@pytest.fixture(scope="module", params=[(4, 2), (4, 4), (8, 4)], ids=["H2-Hkv1", "H2-Hkv2", "H4-Hkv2"])
def pair(request):
    heads, kv_heads = request.param
    return tiny_pair(kv_heads, heads=heads)


@pytest.fixture
def paths(monkeypatch):
    """Counts the calls of each kernel path, so a test can check which one it exercised."""
    counts = {"dense": 0, "varlen": 0, "decode": 0}
    for name, key in (("_dense_call", "dense"), ("_varlen_call", "varlen"), ("_decode_call", "decode")):
        fn = getattr(hf, name)

        def counted(*a, _fn=fn, _key=key, **k):
            counts[_key] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(hf, name, counted)
    return counts


def ids_and_mask(padding, B=2, N=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    if padding == "right":
        mask[1, N - 3:] = 0
    elif padding == "left":
        mask[1, :4] = 0
    return ids, mask


def assert_valid_close(actual, expected, mask, table, what):
    valid = mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], **table[torch.float32], msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------------------- logits

@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_logits_match_eager(pair, padding, paths):
    ref, ours = pair
    ids, mask = ids_and_mask(padding)
    am = None if padding == "none" else mask
    with torch.no_grad():
        expected = ref(ids, attention_mask=am).logits
        actual = ours(ids, attention_mask=am).logits
    assert_valid_close(actual, expected, mask, FWD, f"logits, {padding} padding")
    layers = ref.config.num_hidden_layers
    if padding == "none":
        assert paths["dense"] == layers
    else:
        assert paths["dense"] == 0 and paths["varlen"] == layers
    # An all-ones mask is no padding: transformers' FlashAttention mask convention hands the modules None.
    if padding == "none":
        with torch.no_grad():
            torch.testing.assert_close(ours(ids, attention_mask=mask).logits, actual, rtol=0, atol=0)


def _cached_steps(model, ids, mask, chunks):
    """Prefill ids[:, :chunks[0]] then feed the following chunks against the cache; the logits of every step."""
    out, cache, start, logits = None, None, 0, []
    for size in chunks:
        part = slice(start, start + size)
        am = None if mask is None else mask[:, :start + size]
        out = model(ids[:, part], attention_mask=am, cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
        start += size
    return logits


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_cached_chunks_match_eager(padding, paths):
    """Prefill 5 tokens, then chunks against the cache: 3 tokens and 1 token (decode kernel path, or varlen where
    the mask has holes: right padding), then 18 tokens (> DECODE_MAX_QUERIES: varlen, causal bottom-right)."""
    ref, ours = tiny_pair(2)
    ids, mask = ids_and_mask("none", N=27, seed=3)
    if padding == "left":
        mask[1, :2] = 0
    elif padding == "right":
        mask[1, 3:5] = 0  # padding inside the first chunk: later keys come after a hole
    am = None if padding == "none" else mask
    chunks = [5, 3, 1, 18]
    with torch.no_grad():
        expected = _cached_steps(ref, ids, am, chunks)
        actual = _cached_steps(ours, ids, am, chunks)
    start = 0
    for size, e, a in zip(chunks, expected, actual):
        assert_valid_close(a, e, mask[:, start:start + size], FWD, f"chunk at {start}, {padding} padding")
        start += size
    assert paths["decode"] == (4 if padding != "right" else 0)  # 2 layers x the 3- and 1-token chunks


# ------------------------------------------------------------------------------------------------------- generation

def test_greedy_generation_left_padded_matches_eager(paths):
    ref, ours = tiny_pair(2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # prompts of 8 and 5 tokens, left-padded
    ids[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True)
    expected = ref.generate(ids, **kw)
    actual = ours.generate(ids, **kw)
    assert torch.equal(actual.sequences, expected.sequences)
    assert actual.sequences.shape == (2, 24)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores)):
        torch.testing.assert_close(a, e, **FWD[torch.float32], msg=lambda m: f"scores of step {step}: {m}")
    layers = ref.config.num_hidden_layers
    assert paths["varlen"] >= layers and paths["decode"] == 15 * layers  # prefill, then 15 single-token steps


# --------------------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 4)], ids=["H2-Hkv1", "H4-Hkv2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_training_gradients_match_eager(padding, heads, kv_heads, paths):
    ref, ours = tiny_pair(kv_heads, seed=7, heads=heads)
    ids, mask = ids_and_mask(padding, N=8, seed=8)
    # No loss on padded tokens, nor on predictions made AT padded positions (with left padding the last pad position
    # predicts the first real token): a padded query's attention output is undefined in eager (it attends to no
    # valid key) and zero in the kernels, so gradients through it differ by design.
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    am = None if padding == "none" else mask
    grads = []
    for model in (ref, ours):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(ids, attention_mask=am, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g_ref in grads[0].items():
        g = grads[1][name]
        assert g is not None and g_ref is not None, name
        torch.testing.assert_close(g, g_ref, **BWD[torch.float32], msg=lambda m: f"grad of {name}: {m}")
    for part in ("lambda_q1", "lambda_k2", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"):
        assert any(part in n and g.abs().max() > 0 for n, g in grads[1].items()), part
    assert paths["dense" if padding == "none" else "varlen"] == ref.config.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 numerics need CUDA (the interpreter's bf16 is not IEEE)")
@pytest.mark.parametrize("padding", ["none", "left"])
def test_bf16_cached_chunks_within_eagers_own_error(padding):
    """bf16 on a GPU: prefill + decode chunks; ours within LOWP_FACTOR x eager bf16's own error against fp32 eager."""
    ref32, _ = tiny_pair(2)
    ref32 = ref32.cuda()
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    ours = hf.use_diff_attn(copy.deepcopy(ref16))
    ids, mask = ids_and_mask("none", N=27, seed=3)
    if padding == "left":
        mask[1, :2] = 0
    ids, mask = ids.cuda(), mask.cuda()
    am = None if padding == "none" else mask
    chunks = [5, 3, 1, 18]
    with torch.no_grad():
        steps = [_cached_steps(m, ids, am, chunks) for m in (ref32, ref16, ours)]
    start = 0
    for size, e32, e16, a in zip(chunks, *steps):
        valid = mask[:, start:start + size].bool()
        assert_close_lowp(a[valid], e32[valid].double(), e16[valid], f"bf16 chunk at {start}, {padding} padding")
        start += size


# -------------------------------------------------------------------------------------------------------- refusals

def test_refuses_other_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(TypeError, match="DiffLlama"):
        hf.use_diff_attn(llama)
    with pytest.raises(TypeError, match="DiffLlama"):
        hf.use_diff_attn(torch.nn.Linear(2, 2))


def test_refuses_head_dim_and_dtype():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="head_dim 8"):
        hf.use_diff_attn(DiffLlamaForCausalLM(tiny_config(hidden_size=32, head_dim=8)))
    with pytest.raises(TypeError, match="float64"):
        hf.use_diff_attn(DiffLlamaForCausalLM(tiny_config()).double())


def test_refusals_at_run_time():
    ref, ours = tiny_pair(2)
    ids, mask = ids_and_mask("left")
    with torch.no_grad():
        with pytest.raises(ValueError, match="output_attentions"):
            ours(ids, output_attentions=True)
        with pytest.raises(ValueError, match="2-D padding masks"):  # a custom 4-D mask
            ours(ids, attention_mask=torch.zeros(2, 1, 9, 9))
        with pytest.raises(ValueError, match="packed sequences"):  # position_ids restarting within a row, no cache
            ours(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2), use_cache=False)
        with pytest.raises(ValueError, match="packed"):
            ours(ids, cu_seq_lens_q=torch.tensor([0, 9], dtype=torch.int32))
        from transformers import StaticCache

        with pytest.raises(ValueError, match="static cache"):
            ours(ids, cache=StaticCache(config=ours.config, max_cache_len=32), use_cache=True)
    attn = ours.model.layers[0].self_attn
    attn.attention_dropout = 0.1
    try:
        ours.train()
        with pytest.raises(ValueError, match="attention_dropout"):
            ours(ids)
        ours.eval()
        with torch.no_grad():
            ours(ids)  # dropout is off in eval mode: allowed
    finally:
        attn.attention_dropout = 0.0


def test_switch_twice_and_back():
    ref, ours = tiny_pair(2)
    ids, mask = ids_and_mask("left")
    hf.use_diff_attn(ours)  # already switched: harmless
    assert hf.is_diff_attn_enabled(ours) and ours.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    hf.use_diff_attn(ours, enable=False)
    assert not hf.is_diff_attn_enabled(ours) and ours.config._attn_implementation == "eager"
    assert type(ours.model.layers[0].self_attn) is hf.DiffLlamaAttention
    hf.use_diff_attn(ours, enable=False)  # already off: harmless
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_switch_back_from_the_outer_model_after_switching_the_inner_one():
    """The previous attention implementation is remembered where either model can find it (they share the modules
    and the config): switching the inner DiffLlamaModel and back through the outer model restores it."""
    ref, _ = tiny_pair(2)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("sdpa")
    hf.use_diff_attn(ours.model)
    assert hf.is_diff_attn_enabled(ours)
    hf.use_diff_attn(ours, enable=False)
    assert not hf.is_diff_attn_enabled(ours) and ours.config._attn_implementation == "sdpa"


def test_training_after_a_forward_under_inference_mode():
    """The unit norm weight cached by the first call must not be an inference tensor when that call ran under
    torch.inference_mode() (an HF pipeline, an eval loop): a later training step saves it for the backward."""
    hf._ONES.clear()
    ref, ours = tiny_pair(2)
    ids, _ = ids_and_mask("none")
    with torch.inference_mode():
        ours(ids)
    ours.train()
    ours(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in ours.model.layers[0].self_attn.parameters())


def test_a_refused_cached_call_leaves_the_cache_as_it_was():
    ref, ours = tiny_pair(2)
    ids, mask = ids_and_mask("left")
    with torch.no_grad():
        cache = ours(ids, attention_mask=mask, use_cache=True).past_key_values
        before = cache.get_seq_length()
        with pytest.raises(ValueError, match="2-D attention mask has shape"):
            ours(ids[:, :1], attention_mask=mask, cache=cache, use_cache=True)  # one key short: refused
        assert cache.get_seq_length() == before


# ---------------------------------------------------------------------------------------------- gather, imports

def test_gather_pairs_reorders_heads_in_one_contiguous_copy():
    B, m, L, d = 2, 3, 5, 4
    x = torch.randn(B, L, 2 * m, d).transpose(1, 2)  # (B, 2m, L, d), strided like DiffLlama's projections
    b_idx, n_idx = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 2])
    pairs = hf._gather_pairs(x, b_idx, n_idx)
    values = hf._gather_pairs(x, b_idx, n_idx, value=True)
    assert pairs.shape == (3, 2 * m, d) and pairs.is_contiguous() and values.shape == (3, m, 2 * d)
    for t, (b, n) in enumerate(zip(b_idx.tolist(), n_idx.tolist())):
        for j in range(m):
            assert torch.equal(pairs[t, 2 * j], x[b, j, n]) and torch.equal(pairs[t, 2 * j + 1], x[b, j + m, n])
            assert torch.equal(values[t, j], torch.cat([x[b, j, n], x[b, j + m, n]]))


def _run(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_kernels_does_not_import_transformers_and_missing_transformers_names_the_extra():
    proc = _run("import sys, kernels, kernels.integrations\n"
                "assert 'transformers' not in sys.modules\n"
                "sys.modules['transformers'] = None  # as if not installed\n"
                "try:\n"
                "    import kernels.integrations.transformers\n"
                "except ImportError as e:\n"
                "    print('ImportError:', e)\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ImportError:" in proc.stdout and '".[lm]"' in proc.stdout, proc.stdout
