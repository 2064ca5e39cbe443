"""The backward's rows of the roofline table (benchmarks/roofline.py): preprocess, dK/dV, dQ and the one-launch forms
(kernels/bwd_fused.py), per listed config, plus whole-backward totals per form.

Per diff-head, a needed (query, key) pair costs 20·d matrix FLOPs (QKᵀ of both maps 4d, dP = dO·Vᵀ 4d, dV on the
combined map 4d, dK1+dK2 4d, dQ1+dQ2 4d) and 2 exponentials (one per map). What each kernel executes per pair of
its own loops (padded to whole blocks):

    dkdv       16d (maps, dP, dV, dK)            2 exp      split (d=128): 20d, 4 exp (the maps twice)
    dq         12d (maps and dP again, dQ)        2 exp
    fused      dkdv + dq in one launch            4 exp      (the same work, one launch)
    atomic     20d (dQ's share added atomically)  2 exp      (+ BLOCK_M·2d fp32 atomic adds per block pair)

`useful_flops` is each kernel's share of the 20d: dK/dV 16d, dQ 4d (its maps and dP are counted in dK/dV), the
one-launch forms and the totals 20d, all over needed pairs only (N², or N(N+1)/2 causal).

Bytes, two numbers. `l2_bytes`: each operand once per time the kernel streams it (dK/dV re-reads Q, dO, LSE, Δ, λ
once per key block that sees them; dQ re-reads K, V once per query block), outputs once; per-token λ (4 B per row).
`bytes` (what the table's memory ceiling divides): device-memory traffic, each operand and output once per kernel —
the re-reads hit L2, because a head's programs are consecutive in the grid (`fwd._block_and_head`) and a head's
streamed rows are at most ~1 MB at N = 4096 (L2: 50 MB). Counting `l2_bytes` against the DRAM ceiling instead would
call every dK/dV row memory-bound, which the first H200 run contradicts (the N = 4096 backward ran 8 ms, not the
~20 ms that would predict). Atomic adds (the atomic form) resolve in L2: counted apart, as `atomic_adds`.
"""

from __future__ import annotations

from kernels import configs


def _cdiv(a, b):
    return -(-a // b)


def dkdv_pairs(N, bm, bn, causal):
    """(executed pairs, query rows streamed) of the dK/dV loops: key block j visits query rows from the block
    holding its first key (causal) or 0, to N, in whole BLOCK_M steps."""
    pairs = rows = 0
    for j in range(_cdiv(N, bn)):
        lo = (j * bn // bm) * bm if causal else 0
        r = _cdiv(N - lo, bm) * bm
        pairs += bn * r
        rows += r
    return pairs, rows


def dq_pairs(N, bm, bn, causal):
    """(executed pairs, key rows streamed) of the dQ loops: query block i visits keys up to its last row (causal) or
    N, in whole BLOCK_N steps."""
    pairs = keys = 0
    for i in range(_cdiv(N, bm)):
        hi = min(i * bm + bm, N) if causal else N
        kk = _cdiv(hi, bn) * bn
        pairs += bm * kk
        keys += kk
    return pairs, keys


def _name(row, kernel):
    split = " split" if row.split else ""
    return f"{row.block_m}x{row.block_n}x{row.warps}w s{row.stages}{split}"


def kernel_rows(shape, kernel, row):
    """One row of `kernel` ("dkdv", "dq", "fused", "atomic") with config `row`, for the whole batch."""
    N, d, e, heads = shape.N, shape.d, shape.dtype_bytes, shape.B * shape.H
    need = shape.pairs
    q_row = 2 * d * e + 2 * d * e + 4 * 4 + 4  # Q1, Q2, dO, both LSEs and Δs, λ: what a query row costs to stream
    k_row = 2 * d * e + 2 * d * e  # K1, K2, V
    out = {"dq": 2 * N * d * e, "dkdv": 4 * N * d * e}  # dQ1+dQ2; dK1+dK2 and dV
    bm, bn = row.block_m, row.block_n
    flops = exp = l2 = dram = atomics = 0
    note = ""
    if kernel in ("dkdv", "fused", "atomic"):
        pairs, rows = dkdv_pairs(N, bm, bn, shape.causal)
        passes = 2 if row.split else 1
        flops += pairs * (20 if row.split else 16) * d
        exp += pairs * 2 * passes
        l2 += N * k_row + passes * rows * q_row + out["dkdv"]
        dram += N * (k_row + q_row) + out["dkdv"]
        if kernel == "atomic":
            flops += pairs * 4 * d
            atomics = rows * 2 * d  # every streamed query row gets 2d fp32 adds (dQ1 and dQ2)
            extra = 2 * N * d * 4 * 2 + out["dq"]  # zero fill and read back of the fp32 buffer, the cast's write
            l2 += extra
            dram += extra
            note = f"{atomics * heads / 1e9:.2f} G fp32 atomic adds (resolved in L2; not in bytes)"
    if kernel in ("dq", "fused"):
        # fused: the dQ phase runs BLOCK_N query rows with BLOCK_M-key steps
        qm, kn = (bn, bm) if kernel == "fused" else (bm, bn)
        pairs, keys = dq_pairs(N, qm, kn, shape.causal)
        flops += pairs * 12 * d
        exp += pairs * 2
        l2 += N * q_row + keys * k_row + out["dq"]
        dram += N * (k_row + q_row) + out["dq"] if kernel == "dq" else out["dq"]  # fused: read by the dK/dV phase
    useful = {"dkdv": 16, "dq": 4}.get(kernel, 20) * d * need
    r = {"kernel": kernel, "variant": _name(row, kernel), "useful_flops": useful * heads,
         "executed_flops": flops * heads, "exp": exp * heads, "bytes": dram * heads, "l2_bytes": l2 * heads}
    if atomics:
        r["atomic_adds"] = atomics * heads
    if note:
        r["note"] = note
    return r


def preprocess_row(shape, norm):
    """Epilogue backward and Δs: reads dout, the output (or pre-norm difference), O2 and λ; writes Δ (2 rows),
    dλ and, with the norm, the epilogue's gradient dO."""
    N, d, e, heads = shape.N, shape.d, shape.dtype_bytes, shape.B * shape.H
    byts = N * (3 * 2 * d * e + 4 + 2 * 4 + 4) + (N * 2 * d * e if norm else 0)
    return {"kernel": "bwd_pre", "variant": "norm" if norm else "plain", "useful_flops": 0, "executed_flops": 0,
            "exp": 0, "bytes": byts * heads, "l2_bytes": byts * heads}


def _total(label, parts, shape):
    heads = shape.B * shape.H
    r = {"kernel": "bwd", "variant": label, "useful_flops": 20 * shape.d * shape.pairs * heads,
         "executed_flops": sum(p["executed_flops"] for p in parts), "exp": sum(p["exp"] for p in parts),
         "bytes": sum(p["bytes"] for p in parts), "l2_bytes": sum(p["l2_bytes"] for p in parts)}
    adds = sum(p.get("atomic_adds", 0) for p in parts)
    if adds:
        r["atomic_adds"] = adds
    r["note"] = "launches: " + " + ".join(f"{p['kernel']} {p['variant']}" for p in parts)
    return r


def rows(shape) -> list:
    p = configs.Problem(shape.d, shape.dtype_bytes, shape.causal, shape.N, 90)
    pre = preprocess_row(shape, norm=True)
    out = [preprocess_row(shape, norm=False), pre]
    listed = {k: configs.fitting_rows(k, p) for k in ("dkdv", "dq", "fused", "atomic")}
    for kernel, rws in listed.items():
        out += [kernel_rows(shape, kernel, r) for r in rws]
    # Totals (with the norm epilogue's preprocess): the fixed separate pair, the best separate pair by predicted
    # FLOPs, and every one-launch row.
    fixed = {k: configs.row_of(k, configs._fixed_row(k, p)) for k in ("dkdv", "dq")}
    parts = [pre, kernel_rows(shape, "dkdv", fixed["dkdv"]), kernel_rows(shape, "dq", fixed["dq"])]
    out.append(_total(f"separate fixed {_name(fixed['dkdv'], 'dkdv')}+{fixed['dq'].block_m}x{fixed['dq'].block_n}",
                      parts, shape))
    for form in ("fused", "atomic"):
        for r in listed[form]:
            out.append(_total(f"{form} {_name(r, form)}", [pre, kernel_rows(shape, form, r)], shape))
    return out
