"""benchmarks/roofline_fwd.py: the forward's roofline rows count what the issue asks for (issue 17)."""

import math

from benchmarks import roofline, roofline_fwd
from benchmarks.common import flops_fwd

KEYS = {"kernel", "variant", "useful_flops", "executed_flops", "exp", "bytes"}


def test_every_shape_has_rows_with_the_core_keys():
    rows = roofline.table(roofline.SHAPES)
    fwd = [r for r in rows if r["kernel"] == "fwd"]
    assert {r["shape"] for r in fwd} == {s.label for s in roofline.SHAPES}
    for r in fwd:
        assert KEYS <= set(r) and r["executed_flops"] >= r["useful_flops"] * (1 - 1e-9) and r["predicted_us"] > 0


def test_counts_match_the_formulas_non_causal():
    """Non-causal, N a multiple of every block: executed = useful = 12·N²·d per diff-head; K/V streamed once per
    row block: B·H·ceil(N/BLOCK_M)·N·(2d + 2d) elements (SPLIT: V twice, plus its fp32 scratch written and read)."""
    shape = roofline.Shape("t", 2, 3, 1024, 64, False)
    for r in roofline_fwd.rows(shape):
        bm = int(r["variant"].split()[1].split("x")[0])
        split = r["variant"].startswith("split")
        assert r["executed_flops"] == r["useful_flops"] == flops_fwd(2, 3, 1024, 64, False)
        heads, n, d = 6, 1024, 64
        kv = heads * math.ceil(n / bm) * n * ((d + 2 * d) * 2 if split else 4 * d) * 2
        io = heads * n * 2 * d * 2 * 2  # q (two heads of d) in, out (2d) out
        scratch = 2 * heads * n * 2 * d * 4 if split else 0
        assert r["bytes"] == io + kv + scratch, r["variant"]
        assert r["exp"] >= 2 * heads * n * n


def test_causal_rows_count_only_visited_blocks():
    shape = roofline.Shape("t", 1, 1, 1000, 64, True)
    for r in roofline_fwd.rows(shape):
        bm, bn = (int(x) for x in r["variant"].split()[1].split("x"))
        cols = sum(math.ceil(min((i + 1) * bm, 1000) / bn) * bn for i in range(math.ceil(1000 / bm)))
        assert r["executed_flops"] == bm * cols * 12 * 64
        assert r["useful_flops"] < r["executed_flops"] < 12 * 1000 * 1000 * 64
