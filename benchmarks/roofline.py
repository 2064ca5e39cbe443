"""Roofline table: what each kernel (and each of its variants) must do and what it executes, per shape, and the time
that predicts at the measured ceilings of the device (issues 17 and 18).

    python -m benchmarks.roofline [--shapes all|vision,text,long-d64,...] [--json out.json]

For every (shape, kernel, variant): useful matmul FLOPs (the minimum the math needs: what `benchmarks/common.flops`
counts), executed matmul FLOPs (tile padding, recomputation), exponentials, bytes moved to and from memory (each
operand read once per time the kernel streams it), and the predicted time: the largest of executed FLOPs at the
matmul ceiling, bytes at the copy ceiling, exponentials at the exponential unit's rate. The prediction is a floor:
a kernel near it is limited by that resource; one far above it is limited by something the model leaves out
(latency, occupancy, synchronisation), which is what the device run is for.

The per-kernel models live beside this file, one module per kernel family, each exposing
`rows(shape: Shape) -> list[dict]` with keys kernel, variant, useful_flops, executed_flops, exp, bytes (and an
optional note): `roofline_fwd` (forward), `roofline_bwd` (backward preprocess, dK/dV, dQ).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, dataclass

# Ceilings of an NVIDIA H200 as measured on the lent machines (device KINDS.md / perf-facts-2026-12-01): dense bf16
# matmul on random data, device-to-device copy; the exponential unit: 16 ex2 per clock per SM x 132 SMs x 1.98 GHz.
CEILINGS = {"matmul_flops": 790e12, "copy_bytes": 4.3e12, "exp": 16 * 132 * 1.98e9}
MODELS = ("roofline_fwd", "roofline_bwd")


@dataclass(frozen=True)
class Shape:
    label: str
    B: int
    H: int  # diff-heads
    N: int
    d: int
    causal: bool
    dtype_bytes: int = 2  # bf16/fp16

    @property
    def pairs(self) -> float:
        """(query, key) pairs per diff-head the math needs: N², halved (plus the diagonal) when causal."""
        return self.N * (self.N + 1) / 2 if self.causal else float(self.N * self.N)


SHAPES = [Shape("vision", 256, 6, 197, 64, False), Shape("text", 256, 4, 77, 64, True)] + [
    Shape(f"{'long' if n == 4096 else f'n{n}'}-d{d}{'-causal' if c else ''}", max(1, 16384 // n), 16, n, d, c)
    for n in (1024, 4096, 8192) for d in (64, 128) for c in (False, True)]


def predict(row: dict) -> dict:
    """The row with its time at each ceiling (µs) and the bound that decides it."""
    t = {"matmul": row["executed_flops"] / CEILINGS["matmul_flops"], "memory": row["bytes"] / CEILINGS["copy_bytes"],
         "exp": row["exp"] / CEILINGS["exp"]}
    bound = max(t, key=t.get)
    return {**row, **{f"{k}_us": v * 1e6 for k, v in t.items()}, "predicted_us": t[bound] * 1e6, "bound": bound,
            "executed_over_useful": row["executed_flops"] / row["useful_flops"] if row["useful_flops"] else None}


def table(shapes) -> list:
    out = []
    for name in MODELS:
        try:
            model = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"benchmarks.{name}":
                raise
            continue  # a kernel family without a model yet
        for shape in shapes:
            out += [{"shape": shape.label, **asdict(shape), **predict(r)} for r in model.rows(shape)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help="comma-separated labels, or all: " + ", ".join(s.label for s in SHAPES))
    p.add_argument("--json")
    args = p.parse_args(argv)
    wanted = None if args.shapes == "all" else set(args.shapes.split(","))
    unknown = (wanted or set()) - {s.label for s in SHAPES}
    if unknown:
        p.error(f"unknown shape(s) {sorted(unknown)}")
    rows = table([s for s in SHAPES if wanted is None or s.label in wanted])
    print(f"{'shape':18} {'kernel':10} {'variant':34} {'exec/useful':>11} {'GFLOP':>8} {'Gexp':>7} {'MB':>8} "
          f"{'pred us':>9} bound")
    for r in rows:
        print(f"{r['shape']:18} {r['kernel']:10} {r['variant']:34} {r['executed_over_useful'] or 0:11.2f} "
              f"{r['executed_flops'] / 1e9:8.1f} {r['exp'] / 1e9:7.2f} {r['bytes'] / 1e6:8.1f} "
              f"{r['predicted_us']:9.1f} {r['bound']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": CEILINGS, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
