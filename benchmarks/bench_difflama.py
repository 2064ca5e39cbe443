"""One transformers DiffLlama attention layer (projections, RoPE, attention, o_proj): prefill and one decode step,
transformers' eager and sdpa attention against `kernels.integrations.transformers.use_diff_attn`.

    python -m benchmarks.bench_difflama            # on a GPU: bf16, hidden 2048, 32 query / 8 kv heads of d = 64
    python -m benchmarks.bench_difflama --smoke    # anywhere: tiny shapes under the interpreter, no timings

Rows (µs per call of the attention module, `triton.testing.do_bench`):
- prefill B x N without padding (ours: the dense kernel, q/k/v in place) and with a random left padding (ours: the
  varlen path; its unpad gather and output scatter are also timed alone, `copies`, the copies the module keeps);
- decode: one new token per sequence against a DynamicCache of L keys (the cache's own torch.cat of the new key is
  in every provider's time; the cache is cropped back after each call). Ours takes the decode path.
Every provider's output is checked against transformers' eager attention in fp32 on the same weights before it is
timed (max error printed). Not wired into device_check.sh.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys


def _time_us(fn, smoke):
    if smoke:
        fn()
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3


def _layer(args, device, dtype):
    """The attention module of a one-layer DiffLlama, its rotary embedding and config (eager)."""
    import torch
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

    cfg = DiffLlamaConfig(vocab_size=128, hidden_size=args.heads * args.head_dim, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                          head_dim=args.head_dim, max_position_embeddings=max(args.seqlen, args.cache) + 8,
                          attn_implementation="eager")
    torch.manual_seed(0)
    model = DiffLlamaForCausalLM(cfg).eval().to(device)
    return model


def _mask_for(model, impl, embeds, mask2d, cache, position_ids):
    """The mask transformers would hand the attention modules under `impl` (4-D for eager/sdpa, 2-D or None ours)."""
    from transformers.masking_utils import create_causal_mask

    saved = model.config._attn_implementation
    model.config._attn_implementation_internal = impl
    try:
        return create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=mask2d, cache=cache,
                                  position_ids=position_ids)
    finally:
        model.config._attn_implementation_internal = saved


def _run_attention(model, impl, x, mask2d, cache=None):
    """One call of layer 0's attention module as the decoder layer makes it, under attention implementation `impl`."""
    import torch

    B, L, _ = x.shape
    past = cache.get_seq_length(0) if cache is not None else 0
    if mask2d is not None:
        position_ids = (mask2d.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]
    else:
        position_ids = torch.arange(past, past + L, device=x.device)[None].expand(B, -1)
    attn_mask = _mask_for(model, impl, x, mask2d, cache, position_ids)
    pe = model.model.rotary_emb(x, position_ids=position_ids)
    saved = model.config._attn_implementation
    model.config._attn_implementation_internal = impl
    try:
        out, _ = model.model.layers[0].self_attn(x, position_embeddings=pe, attention_mask=attn_mask, cache=cache)
    finally:
        model.config._attn_implementation_internal = saved
    return out


def _left_padding(B, N, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, N // 4), N + 1, (B,), generator=g)
    lens[0] = N
    return (torch.arange(N)[None, :] >= (N - lens)[:, None]).to(device)


def rows(args):
    import torch
    from transformers import DynamicCache

    from kernels.integrations import transformers as hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = _layer(args, device, dtype)
    ref32 = base  # fp32 eager: the check
    models = {"eager": base.to(dtype) if dtype == torch.float32 else copy.deepcopy(base).to(dtype)}
    models["sdpa"] = models["eager"]
    ours = hf.use_diff_attn(copy.deepcopy(models["eager"]))
    impl_of = {"eager": "eager", "sdpa": "sdpa", "ours": hf.ATTN_IMPLEMENTATION}
    models["ours"] = ours
    B, N, L, hidden = args.batch, args.seqlen, args.cache, args.heads * args.head_dim
    g = torch.Generator().manual_seed(1)

    def check(name, fn32, fn, valid):
        with torch.no_grad():
            expected, actual = fn32(), fn()
        err = (actual.float() - expected.float())[valid].abs().max().item()
        bound = 1e-4 if dtype == torch.float32 else 5e-2
        if not err <= bound:
            raise SystemExit(f"{name}: max error {err:.2e} against fp32 eager exceeds {bound:g}")
        return err

    # prefill, without and with padding
    x = torch.randn(B, N, hidden, generator=g).to(device)
    for padded in (False, True):
        mask = _left_padding(B, N, device) if padded else None
        valid = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=device)
        kind = "left-padded" if padded else "unpadded   "
        line = f"prefill B={B} N={N} {kind} Hq={args.heads} Hkv={args.kv_heads} d={args.head_dim} {str(dtype)[6:]}"
        for name in ("eager", "sdpa", "ours"):
            m, impl = models[name], impl_of[name]
            xd = x.to(dtype)
            err = check(name, lambda: _run_attention(ref32, "eager", x, mask),
                        lambda: _run_attention(m, impl, xd, mask), valid)
            with torch.no_grad():
                t = _time_us(lambda: _run_attention(m, impl, xd, mask), args.smoke)
            line += f" | {name} {t:9.1f} us (err {err:.1e})"
        if padded:
            line += f" | copies {_time_copies(ours, x.to(dtype), mask, args.smoke):9.1f} us"
        print(line)

    # one decode step against a cache of L keys (the last is the new token's)
    Hkv, d = args.kv_heads, args.head_dim
    k_past = torch.randn(B, Hkv, L - 1, d, generator=g).to(device)
    v_past = torch.randn(B, Hkv, L - 1, d, generator=g).to(device)
    x1 = torch.randn(B, 1, hidden, generator=g).to(device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    mask[1:, : L // 3] = False  # left padding in all but the first sequence

    def cache_of(dt):
        c = DynamicCache()
        c.update(k_past.to(dt), v_past.to(dt), 0)
        return c

    line = f"decode  B={B} L={L} left-padded Hq={args.heads} Hkv={args.kv_heads} d={d} {str(dtype)[6:]}"
    for name in ("eager", "sdpa", "ours"):
        m, impl = models[name], impl_of[name]
        cache = cache_of(dtype)
        x1d = x1.to(dtype)

        def step():
            out = _run_attention(m, impl, x1d, mask, cache)
            cache.crop(-1)
            return out

        c32 = cache_of(torch.float32)

        def step32():
            out = _run_attention(ref32, "eager", x1, mask, c32)
            c32.crop(-1)
            return out

        err = check(name, step32, step, torch.ones(B, 1, dtype=torch.bool, device=device))
        with torch.no_grad():
            t = _time_us(step, args.smoke)
        line += f" | {name} {t:9.1f} us (err {err:.1e})"
    print(line)


def _time_copies(model, x, mask, smoke):
    """The varlen path's own copies at this shape: the unpad gathers of q, k, v (heads reordered inside) and the
    output scatter, without the kernel."""
    import torch

    from kernels.integrations import transformers as hf

    attn = model.model.layers[0].self_attn
    B, N, _ = x.shape
    q = attn.q_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)
    b_idx, n_idx = mask.nonzero(as_tuple=True)
    out = torch.zeros(b_idx.numel(), q.shape[1] // 2, 2 * attn.head_dim, device=x.device, dtype=x.dtype)

    def copies():
        hf._gather_pairs(q, b_idx, n_idx), hf._gather_pairs(k, b_idx, n_idx)
        hf._gather_pairs(v, b_idx, n_idx, value=True)
        padded = out.new_zeros(B, N, out.shape[1], out.shape[2])
        padded[b_idx, n_idx] = out
        return padded

    with torch.no_grad():
        return _time_us(copies, smoke)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter, no timings")
    p.add_argument("--heads", type=int, default=32, help="query heads Hq (Hq/2 diff-heads)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hkv_hf (even)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048, help="prefill tokens per sequence")
    p.add_argument("--cache", type=int, default=4096, help="keys in the cache at the decode step")
    args = p.parse_args(argv)
    if args.smoke:
        if "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        args.heads, args.kv_heads, args.head_dim, args.batch, args.seqlen, args.cache = 4, 2, 16, 2, 12, 20
    rows(args)


if __name__ == "__main__":
    main()
