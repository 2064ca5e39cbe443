"""Language-model forms of the kernel: decode µs per token against two SDPA calls over the cache and against the
memory-bandwidth floor, and varlen against padding every sequence to the longest.

    python -m benchmarks.bench_lm               # on a GPU: the issue's rows (B = 1, 32; cache 4k, 32k)
    python -m benchmarks.bench_lm --smoke       # anywhere: tiny shapes, results checked against the reference

Decode floor: the bytes of K and V read once (B·Hkv·L·(2d + 2d) elements: two key heads of width d and one value
head of width 2d per group and token) over the peak bandwidth (`--bandwidth`, 4.3e12 B/s: the issue's H200 figure).
Every row is checked against the float64 reference before it is timed (on a slice of the batch at large caches).
Not yet wired into bench_diff_attn / device_check.sh.
"""

from __future__ import annotations

import argparse
import os
import sys


def _check(err, dtype, what):
    """Refuse to time a wrong kernel: max error against float64 within a loose bound per dtype."""
    import torch

    bound = 1e-4 if dtype == torch.float32 else 3e-2
    if not err <= bound:
        raise SystemExit(f"{what}: max error {err:.2e} against the float64 reference exceeds {bound:g}")


def _time_us(fn, smoke):
    if smoke:
        fn()
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3


def decode_rows(args, device, dtype):
    import torch
    import torch.nn.functional as F

    from kernels import diff_attn_decode, diff_attn_decode_reference

    H, Hkv, d = args.heads, args.kv_heads, args.head_dim
    for B in args.batches:
        for L in args.caches:
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(B, 2 * H, 1, d, generator=g).to(device, dtype)
            kc = torch.randn(B, 2 * Hkv, L, d, generator=g).to(device, dtype)
            vc = torch.randn(B, Hkv, L, 2 * d, generator=g).to(device, dtype)
            lens = torch.full((B,), L, dtype=torch.int32, device=device)
            ours = diff_attn_decode(q, kc, vc, 0.8, cache_seqlens=lens)
            ref = diff_attn_decode_reference(q[:1].double(), kc[:1].double(), vc[:1].double(), 0.8,
                                             cache_seqlens=lens[:1])
            err = (ours[:1].double() - ref).abs().max().item()
            _check(err, dtype, f"decode B={B} L={L}")
            # Baseline: two SDPA calls over the cache (one per map; GQA through enable_gqa), then the difference.
            q1, q2 = q[:, 0::2], q[:, 1::2]
            k1, k2 = kc[:, 0::2], kc[:, 1::2]

            def sdpa():
                o1 = F.scaled_dot_product_attention(q1, k1, vc, enable_gqa=True)
                o2 = F.scaled_dot_product_attention(q2, k2, vc, enable_gqa=True)
                return o1 - 0.8 * o2

            t_ours = _time_us(lambda: diff_attn_decode(q, kc, vc, 0.8, cache_seqlens=lens), args.smoke)
            t_sdpa = _time_us(sdpa, args.smoke)
            nbytes = B * Hkv * L * 4 * d * kc.element_size()
            floor = nbytes / args.bandwidth * 1e6
            print(f"decode B={B:3d} L={L:6d} H={H} Hkv={Hkv} d={d} {str(dtype)[6:]:8s} ours {t_ours:9.1f} us  "
                  f"sdpa x2 {t_sdpa:9.1f} us  floor {floor:8.1f} us  ours/floor {t_ours / floor:6.2f}  "
                  f"max err {err:.1e}")


def varlen_rows(args, device, dtype):
    import torch

    from kernels import diff_attn, diff_attn_varlen, diff_attn_varlen_reference

    H, d = args.heads, args.head_dim
    g = torch.Generator(device="cpu").manual_seed(1)
    for B, longest in args.varlen:
        lens = torch.randint(max(1, longest // 4), longest + 1, (B,), generator=g)
        lens[0] = longest
        cu = torch.tensor([0] + lens.cumsum(0).tolist(), dtype=torch.int32, device=device)
        T = int(lens.sum())
        q, k = (torch.randn(T, 2 * H, d, generator=g).to(device, dtype) for _ in range(2))
        v = torch.randn(T, H, 2 * d, generator=g).to(device, dtype)
        ours = diff_attn_varlen(q, k, v, 0.8, cu, cu, longest, longest, causal=True)
        n0 = int(lens[0])
        ref = diff_attn_varlen_reference(q[:n0].double(), k[:n0].double(), v[:n0].double(), 0.8, cu[:2], cu[:2],
                                         n0, n0, causal=True)
        err = (ours[:n0].double() - ref).abs().max().item()
        _check(err, dtype, f"varlen B={B} longest={longest}")
        # Baseline: the dense kernel on the batch padded to the longest sequence (equal-length layout).
        qp, kp = (torch.zeros(B, 2 * H, longest, d, device=device, dtype=dtype) for _ in range(2))
        vp = torch.zeros(B, H, longest, 2 * d, device=device, dtype=dtype)
        t_ours = _time_us(lambda: diff_attn_varlen(q, k, v, 0.8, cu, cu, longest, longest, causal=True), args.smoke)
        t_pad = _time_us(lambda: diff_attn(qp, kp, vp, 0.8, causal=True), args.smoke)
        print(f"varlen B={B:3d} longest={longest:5d} tokens={T:7d} (padded {B * longest:7d}) H={H} d={d} "
              f"ours {t_ours:9.1f} us  padded dense {t_pad:9.1f} us  max err {err:.1e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter, no timings")
    p.add_argument("--heads", type=int, default=16, help="diff-heads H (2H query heads)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value groups Hkv")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the decode floor")
    args = p.parse_args(argv)
    if args.smoke:
        if "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        args.heads, args.kv_heads, args.head_dim = 2, 1, 16
        args.batches, args.caches, args.varlen = [1, 3], [40, 100], [(3, 20)]
    else:
        args.batches, args.caches, args.varlen = [1, 32], [4096, 32768], [(16, 2048), (64, 1024)]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    decode_rows(args, device, dtype)
    varlen_rows(args, device, dtype)


if __name__ == "__main__":
    main()
