"""What the op benchmark's rows say: speed-ups within a case, the fastest baseline, noise, and the open issues'
targets.

Every ratio is "their time / our time" within one case (shape, batch, dtype, mode). The one that decides a claim is
against the **fastest non-triton provider** of the case (`best_baseline`), not a baseline chosen after the fact; the
per-provider ratios stand beside it. A ratio whose two timings' [min, max] ranges overlap is reported as noise.
"""

from __future__ import annotations

from .common import same_within_noise

CASE_KEYS = ("shape", "B", "H", "N", "d", "causal", "dtype", "mode")


def _timing(r):
    return {"ms": r["ms"], "ms_min": r.get("ms_min") or r["ms"], "ms_max": r.get("ms_max") or r["ms"]}


def add_speedups(rows):
    """Adds to each timed row: `speedup_vs` {provider: their ms / this ms} for every other timed provider of the
    case, `speedup_vs_eager` / `speedup_vs_sdpa2` (table columns), `best_baseline` (fastest timed non-triton
    provider), `speedup_vs_best`, and `vs_best_noise` (True when the two timings' ranges overlap)."""
    by_case = {}
    for r in rows:
        by_case.setdefault(tuple(r[k] for k in CASE_KEYS), []).append(r)
    for case in by_case.values():
        timed = [r for r in case if r.get("ms")]
        baselines = [r for r in timed if not r["provider"].startswith("triton")]
        best = min(baselines, key=lambda r: r["ms"]) if baselines else None
        for r in case:
            ok = bool(r.get("ms"))
            r["speedup_vs"] = {b["provider"]: b["ms"] / r["ms"] for b in timed if b is not r} if ok else {}
            for name in ("eager", "sdpa2"):
                r[f"speedup_vs_{name}"] = r["speedup_vs"].get(name)
            others = [b for b in baselines if b is not r]
            rbest = min(others, key=lambda b: b["ms"]) if others else None
            if r["provider"].startswith("triton"):
                rbest = best
            r["best_baseline"] = rbest["provider"] if rbest and ok else None
            r["speedup_vs_best"] = rbest["ms"] / r["ms"] if rbest and ok else None
            r["vs_best_noise"] = same_within_noise(_timing(r), _timing(rbest)) if rbest and ok else None
    return rows


# The open issues' targets (H100/H200, bf16), checked on every run that has the rows they need. (name, shape
# label, mode, metric, threshold): "speedup" is against sdpa2 (the issues' yardstick: two SDPA calls with the
# activation-dtype combine) and is reported beside the ratio against the fastest baseline of the case.
TARGETS = [
    ("vision fwd >= 2.0x sdpa2", "vision", "fwd", "speedup", 2.0),  # issue 17
    ("text fwd >= 1.5x sdpa2", "text", "fwd", "speedup", 1.5),
    *[(f"{s} fwd >= 1.0x sdpa2", s, "fwd", "speedup", 1.0)
      for s in ("long-d64", "long-d64-causal", "long-d128", "long-d128-causal")],
    ("vision fwd+bwd >= 2.0x sdpa2", "vision", "fwd+bwd", "speedup", 2.0),  # issue 18
    ("text fwd+bwd >= 1.5x sdpa2", "text", "fwd+bwd", "speedup", 1.5),
    *[(f"{s} fwd+bwd >= 1.0x sdpa2", s, "fwd+bwd", "speedup", 1.0)
      for s in ("long-d64", "long-d64-causal", "long-d128", "long-d128-causal")],
    ("long-d64 bwd >= 300 TFLOP/s", "long-d64", "bwd", "tflops", 300.0),
]


def evaluate_targets(rows):
    """[{target, value, met, vs_best, best_baseline, noise}] for each target whose rows (bf16, the largest batch
    of that shape) are present. `met` needs the value over the threshold and, for ratios, outside the noise."""
    out = []
    for name, shape, mode, metric, threshold in TARGETS:
        cand = [r for r in rows if r["shape"] == shape and r["mode"] == mode and r["dtype"] == "bf16"]
        if not cand:
            continue
        batch = max(r["B"] for r in cand)
        case = {r["provider"]: r for r in cand if r["B"] == batch}
        ours = case.get("triton")
        if not ours or not ours.get("ms"):
            continue
        entry = {"target": f"{name} (B={batch})", "vs_best": ours.get("speedup_vs_best"),
                 "best_baseline": ours.get("best_baseline")}
        if metric == "tflops":
            value, noise = ours["tflops"], False
        else:
            base = case.get("sdpa2")
            if not base or not base.get("ms"):
                continue
            value, noise = base["ms"] / ours["ms"], same_within_noise(_timing(ours), _timing(base))
        entry.update(value=round(value, 3), noise=noise, met=value >= threshold and not noise)
        out.append(entry)
    return out
