"""The language-model references (kernels/reference_lm.py) against independent formulations: the dense reference
where the forms coincide, and explicit per-head loops for GQA and the V2 layout. Plain PyTorch, float64."""

import torch

from kernels import (diff_attn_decode_reference, diff_attn_gqa_reference, diff_attn_reference,
                     diff_attn_v2_reference, diff_attn_varlen_reference)

g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_gqa_reference_with_one_group_per_head_is_the_dense_reference():
    q, k, v = rnd(2, 6, 11, 16), rnd(2, 6, 11, 16), rnd(2, 3, 11, 32)
    for causal in (False, True):
        torch.testing.assert_close(diff_attn_gqa_reference(q, k, v, 0.7, causal=causal),
                                   diff_attn_reference(q, k, v, 0.7, causal=causal))


def test_gqa_reference_reads_group_h_div_ratio():
    """Diff-head h of H=4 with Hkv=2 uses key pair (2g, 2g+1) and value head g = h // 2: checked head by head."""
    q, k, v = rnd(1, 8, 9, 16), rnd(1, 4, 9, 16), rnd(1, 2, 9, 32)
    out = diff_attn_gqa_reference(q, k, v, 0.5, causal=True)
    for h in range(4):
        gi = h // 2
        one = diff_attn_reference(q[:, 2 * h:2 * h + 2], k[:, 2 * gi:2 * gi + 2], v[:, gi:gi + 1], 0.5, causal=True)
        torch.testing.assert_close(out[:, h:h + 1], one)


def test_varlen_reference_is_the_dense_reference_per_sequence():
    lens = [4, 0, 9]
    cu = torch.tensor([0, 4, 4, 13], dtype=torch.int32)
    q, k, v = rnd(13, 4, 16), rnd(13, 4, 16), rnd(13, 2, 32)
    lam = rnd(13, 2)
    out = diff_attn_varlen_reference(q, k, v, lam, cu, cu, 9, 9, causal=True)
    start = 0
    for n in lens:
        if n:
            sl = slice(start, start + n)
            dense = diff_attn_reference(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                        v[sl].transpose(0, 1)[None], lam[sl].t()[None], causal=True)
            torch.testing.assert_close(out[sl], dense[0].transpose(0, 1))
        start += n


def test_bottom_right_causal_rows_without_keys_are_zero():
    """3 queries, 1 key: query 2 sees key 0 (bottom-right), queries 0 and 1 see nothing and output 0."""
    cu_q, cu_k = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    q, k, v = rnd(3, 2, 16), rnd(1, 2, 16), rnd(1, 1, 32)
    out = diff_attn_varlen_reference(q, k, v, 0.3, cu_q, cu_k, 3, 1, causal=True)
    assert (out[:2] == 0).all()
    torch.testing.assert_close(out[2, 0], 0.7 * v[0, 0])


def test_decode_reference_is_the_last_rows_of_causal_attention():
    q_all, k, v = rnd(2, 4, 10, 16), rnd(2, 4, 12, 16), rnd(2, 2, 12, 32)
    lens = torch.tensor([10, 7], dtype=torch.int32)
    out = diff_attn_decode_reference(q_all[:, :, -2:], k, v, 0.4, cache_seqlens=lens)
    for b, n in enumerate(lens.tolist()):
        qb = torch.cat([rnd(1, 4, n - 2, 16), q_all[b:b + 1, :, -2:]], dim=2)
        full = diff_attn_reference(qb, k[b:b + 1, :, :n], v[b:b + 1, :, :n], 0.4, causal=True)
        torch.testing.assert_close(out[b:b + 1], full[:, :, -2:])


def test_v2_reference_shares_one_key_and_value_head_per_pair():
    B, H, Hkv, N, d = 1, 4, 2, 7, 16
    q, k, v = rnd(B, 2 * H, N, d), rnd(B, Hkv, N, d), rnd(B, Hkv, N, d)
    lam = rnd(B, H, N).sigmoid()
    out = diff_attn_v2_reference(q, k, v, lam, causal=True)
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    for h in range(H):
        gi = h // (H // Hkv)
        p = [torch.softmax((q[:, 2 * h + m] @ k[:, gi].transpose(-1, -2) * d**-0.5).masked_fill(~mask, -torch.inf),
                           -1) for m in (0, 1)]
        want = p[0] @ v[:, gi] - lam[:, h, :, None] * (p[1] @ v[:, gi])
        torch.testing.assert_close(out[:, h], want)


def _diffllama_eager(q, k, v, lam, scale):
    """transformers' DiffLlamaAttention (eager) written out as it is there: repeat_kv, the value halves
    concatenated and repeated, both maps in one softmax, the output split into halves. q (B, 2H, N, d),
    k and v (B, 2Hkv, N, d); causal, no norm."""
    B, Hq, N, d = q.shape
    rep = Hq // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # repeat_kv
    v = v.repeat_interleave(rep, dim=1)
    v = torch.cat(torch.chunk(v, 2, dim=1), dim=-1).repeat(1, 2, 1, 1)
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    w = torch.softmax((q @ k.transpose(2, 3) * scale).masked_fill(~mask, -torch.inf), dim=-1)
    o1, o2 = torch.chunk(w @ v, 2, dim=1)
    return o1 - lam * o2


def test_decode_reference_halves_layout_is_transformers_diffllama():
    """head_layout="halves" means what DiffLlama computes: decoding all N positions of a full cache is its causal
    attention, for GQA ratios 1 and 2."""
    for Hkv in (2, 1):
        q, k, v = rnd(2, 4, 9, 16), rnd(2, 2 * Hkv, 9, 16), rnd(2, 2 * Hkv, 9, 16)
        lens = torch.tensor([9, 9], dtype=torch.int32)
        out = diff_attn_decode_reference(q, k, v, 0.3, cache_seqlens=lens, head_layout="halves")
        torch.testing.assert_close(out, _diffllama_eager(q, k, v, 0.3, 16**-0.5))


def test_decode_reference_leftpad_is_the_unpadded_cache():
    """Left padding p: the same as the cache without its first p entries (and cache_seqlens - p)."""
    q, k, v = rnd(2, 4, 2, 16), rnd(2, 4, 12, 16), rnd(2, 2, 12, 32)
    lens, pads = torch.tensor([12, 8], dtype=torch.int32), torch.tensor([3, 5], dtype=torch.int32)
    out = diff_attn_decode_reference(q, k, v, 0.4, cache_seqlens=lens, cache_leftpad=pads)
    for b, (n, p) in enumerate(zip(lens.tolist(), pads.tolist())):
        alone = diff_attn_decode_reference(q[b:b + 1], k[b:b + 1, :, p:], v[b:b + 1, :, p:], 0.4,
                                           cache_seqlens=torch.tensor([n - p], dtype=torch.int32))
        torch.testing.assert_close(out[b:b + 1], alone)
