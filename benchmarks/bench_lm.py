"""Language-model forms of the kernel: decode time per step against two SDPA calls over the cache and against the
memory-bandwidth floor, and varlen against padding every sequence to the longest (dense kernel, two SDPA calls).

    python -m benchmarks.bench_lm --json out.json             # on a GPU: the rows below, bf16
    python -m benchmarks.bench_lm --json out.json --json-key lm   # into another benchmark's JSON (device_check.sh)
    python -m benchmarks.bench_lm --smoke                     # anywhere: tiny shapes, interpreter, no claims

Shapes (`--heads/--kv-heads/--head-dim`): H = 16 diff-heads, Hkv = 4 groups, d = 128 — Llama-3-8B's attention read
as DiffLlama does (32 query heads, 8 key heads, head_dim 128: hidden 4096), so the cache per token and layer is that
model's (8 key heads of d plus 4 value heads of 2d). Decode: one new token per sequence (Nq = 1), B = 1 and 32,
full caches of 4k and 32k tokens, the halves layout (transformers' DiffLlama, what the integration runs) and the
interleaved one. `us` is one decode step (B new tokens); `us_per_token` divides it by B.

Decode floor: K and V read once, B·Hkv·L·(2d + 2d) elements (two key heads of width d, one value of width 2d per
group and position) at the card's copy bandwidth, `roofline.CEILINGS["copy_bytes"]` (4.3e12 B/s, measured on the
lent H200s; `--bandwidth` overrides). The queries, the output and the split partials are left out (< 2 % here).
Baseline: two SDPA calls (one per map, GQA through enable_gqa, the 2d-wide value), then the difference.

Varlen: causal, B sequences of random lengths in [longest/4, longest] (the first one the longest), MHA (Hkv = H, so
the padded baselines need no repeated K/V); against the dense kernel and two SDPA calls on the batch zero-padded to
(B, longest) — the padding's cost is what varlen saves.

Every configuration is checked against the float64 reference before it is timed (ours and the baselines; on a
slice of the batch at large sizes). Times: `common.bench` (do_bench, L2 flushed, >= 10 samples). The JSON is
rewritten after every row; `--budget-s` stops starting rows (the rest are recorded as skipped), SIGINT keeps what
was measured.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import common
from .roofline import CEILINGS

DECODE = [(1, 4096), (32, 4096), (1, 32768), (32, 32768)]  # (B, cache length), most important first
VARLEN = [(16, 2048), (64, 1024)]  # (B, longest)
LAYOUTS = ("halves", "interleaved")


def _check(got, ref, dtype, what):
    """Refuse to time a wrong result: max error against float64 within a loose bound per dtype. `ref` is a
    thunk (the float64 references of the large rows are computed only for rows the budget reaches)."""
    import torch

    err = (got.double() - ref()).abs().max().item()
    bound = 1e-4 if dtype == torch.float32 else 3e-2
    if not err <= bound:
        raise RuntimeError(f"{what}: max error {err:.2e} against the float64 reference exceeds {bound:g}")
    return err


def _once(make):
    """A thunk computing make() on first call only."""
    box = []
    return lambda: box[0] if box else (box.append(make()) or box[0])


def decode_cases(args, device, dtype):
    """(row fields, fn, check) per decode row; check() returns the max error against float64 or raises."""
    import torch
    import torch.nn.functional as F

    from kernels import diff_attn_decode, diff_attn_decode_reference

    H, Hkv, d = args.heads, args.kv_heads, args.head_dim
    for B, L in args.decode:
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(B, 2 * H, 1, d, generator=g).to(device, dtype)
        kc = torch.randn(B, 2 * Hkv, L, d, generator=g).to(device, dtype)
        vc = torch.randn(B, 2 * Hkv, L, d, generator=g).to(device, dtype)  # halves: value halves g, g + Hkv
        lens = torch.full((B,), L, dtype=torch.int32, device=device)
        ref = _once(lambda: diff_attn_decode_reference(q[:1].double(), kc[:1].double(), vc[:1].double(), 0.8,
                                                       cache_seqlens=lens[:1], head_layout="halves"))
        # The interleaved layout of the same cache (a copy made once, outside the timing).
        qi = q.view(B, 2, H, 1, d).transpose(1, 2).reshape(B, 2 * H, 1, d)
        ki = kc.view(B, 2, Hkv, L, d).transpose(1, 2).reshape(B, 2 * Hkv, L, d)
        vi = torch.cat([vc[:, :Hkv], vc[:, Hkv:]], dim=-1)  # (B, Hkv, L, 2d)
        floor = B * Hkv * L * 4 * d * kc.element_size() / args.bandwidth * 1e6
        base = dict(form="decode", B=B, L=L, H=H, Hkv=Hkv, d=d, floor_us=floor)
        calls = {"halves": (q, kc, vc), "interleaved": (qi, ki, vi)}
        for layout in LAYOUTS:
            qq, kk, vv = calls[layout]

            def ours(qq=qq, kk=kk, vv=vv, layout=layout):
                return diff_attn_decode(qq, kk, vv, 0.8, cache_seqlens=lens, head_layout=layout)

            yield (dict(base, provider=f"triton-{layout}"), ours,
                   lambda ours=ours, layout=layout: _check(ours()[:1], ref, dtype, f"decode {layout} B={B} L={L}"))
        q1, q2, k1, k2 = q[:, :H], q[:, H:], kc[:, :Hkv], kc[:, Hkv:]

        def sdpa2():
            o1 = F.scaled_dot_product_attention(q1, k1, vi, enable_gqa=True)
            o2 = F.scaled_dot_product_attention(q2, k2, vi, enable_gqa=True)
            return o1 - 0.8 * o2

        yield dict(base, provider="sdpa2"), sdpa2, lambda: _check(sdpa2()[:1], ref, dtype, f"sdpa2 B={B} L={L}")


def varlen_cases(args, device, dtype):
    """(row fields, fn, check) per varlen row, as `decode_cases`."""
    import torch
    import torch.nn.functional as F

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
        n0 = longest
        ref = _once(lambda: diff_attn_varlen_reference(q[:n0].double(), k[:n0].double(), v[:n0].double(), 0.8,
                                                       cu[:2], cu[:2], n0, n0, causal=True))  # sequence 0
        # Zero-padded (B, heads, longest, ·) copies, made once outside the timing.
        qp, kp = (torch.zeros(B, longest, 2 * H, d, device=device, dtype=dtype) for _ in range(2))
        vp = torch.zeros(B, longest, H, 2 * d, device=device, dtype=dtype)
        for b in range(B):
            s, e = int(cu[b]), int(cu[b + 1])
            qp[b, :e - s], kp[b, :e - s], vp[b, :e - s] = q[s:e], k[s:e], v[s:e]
        qp, kp, vp = (t.transpose(1, 2) for t in (qp, kp, vp))
        base = dict(form="varlen", B=B, longest=longest, tokens=T, padded_tokens=B * longest, H=H, Hkv=H, d=d)

        def ours():
            return diff_attn_varlen(q, k, v, 0.8, cu, cu, longest, longest, causal=True)

        def padded():
            return diff_attn(qp, kp, vp, 0.8, causal=True)

        def sdpa2():
            o1 = F.scaled_dot_product_attention(qp[:, 0::2], kp[:, 0::2], vp, is_causal=True)
            o2 = F.scaled_dot_product_attention(qp[:, 1::2], kp[:, 1::2], vp, is_causal=True)
            return o1 - 0.8 * o2

        yield (dict(base, provider="triton-varlen"), ours,
               lambda: _check(ours()[:n0], ref, dtype, f"varlen B={B} longest={longest}"))
        for name, fn in (("triton-padded", padded), ("sdpa2-padded", sdpa2)):
            yield (dict(base, provider=name), fn,
                   lambda fn=fn, name=name: _check(fn()[0].transpose(0, 1), ref, dtype, f"{name} B={B} L={longest}"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter, no claims")
    p.add_argument("--heads", type=int, default=16, help="diff-heads H (2H query heads)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value groups Hkv (2Hkv key heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bandwidth", type=float, default=CEILINGS["copy_bytes"], help="bytes/s of the decode floor")
    p.add_argument("--budget-s", type=float, help="stop starting rows after this many seconds (the rest: skipped)")
    p.add_argument("--json", help="write the rows here (rewritten after every row)")
    p.add_argument("--json-key", help="write under this key of the JSON file, keeping what else it holds")
    args = p.parse_args(argv)
    on_cpu = common.setup_interpreter()
    if on_cpu and not args.smoke:
        p.error("the LM benchmark needs a CUDA GPU; use --smoke on CPU")
    if args.smoke:
        args.heads, args.kv_heads, args.head_dim = 2, 1, 16
        args.decode, args.varlen = [(1, 40), (3, 100)], [(3, 20)]
    else:
        args.decode, args.varlen = DECODE, VARLEN
    import torch

    device = "cpu" if on_cpu else "cuda"
    dtype = torch.float32 if on_cpu else torch.bfloat16
    env = common.environment()
    extra = {"benchmark": "lm", "smoke": args.smoke, "dtype": str(dtype).split(".")[-1], "interrupted": False,
             "bandwidth_bytes_per_s": args.bandwidth,
             "notes": "decode us: one step (B new tokens); floor_us: K and V read once at bandwidth_bytes_per_s"}
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    rows = []

    def save():
        if args.json:
            _write(args.json, args.json_key, env, rows, extra)

    try:
        for gen in (decode_cases, varlen_cases):
            for fields, fn, check in gen(args, device, dtype):
                if deadline is not None and time.monotonic() > deadline:
                    fields = dict(fields, ms=None, skipped=f"time budget ({args.budget_s:g} s) spent")
                else:
                    fields = dict(fields, max_err=check())
                    t = common.bench(fn)
                    fields.update(**t, us=t["ms"] * 1e3)
                    if fields["form"] == "decode":
                        fields.update(us_per_token=fields["us"] / fields["B"],
                                      over_floor=fields["us"] / fields["floor_us"])
                rows.append(fields)
                print(_line(fields), flush=True)
                save()
    except KeyboardInterrupt:  # device_check's `timeout -s INT`
        extra["interrupted"] = True
        print("!! interrupted: the rows so far are saved", flush=True)
    save()
    return 130 if extra["interrupted"] else 0


def _line(r):
    shape = (f"B={r['B']:<3} L={r['L']:<6} floor {r['floor_us']:9.1f} us" if r["form"] == "decode"
             else f"B={r['B']:<3} longest={r['longest']:<5} tokens={r['tokens']} (padded {r['padded_tokens']})")
    got = f"{r['us']:10.1f} us" if r.get("ms") else f"skipped: {r.get('skipped')}"
    tail = f"  x floor {r['over_floor']:.2f}" if r.get("over_floor") else ""
    return f"{r['form']} {shape} H={r['H']} Hkv={r['Hkv']} d={r['d']} {r['provider']:18} {got}{tail}"


def _write(path, key, env, rows, extra):
    """The rows alone, or (with `key`) under that key of an existing JSON (another benchmark's results file)."""
    import json
    import os

    if key is None:
        return common.write_json(path, env, rows, extra)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = {**env, **extra, "rows": rows}
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
