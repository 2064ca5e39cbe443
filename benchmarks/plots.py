"""PNG plots of the benchmarks' JSON rows (matplotlib, Agg): the op benchmark per (shape, dtype, mode) and the model
benchmark per task. `python -m benchmarks.plots op.json out.png` redraws one from a results file."""

from __future__ import annotations

import json
import sys


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_op(rows, path, device=""):
    """One panel per (shape, dtype, mode): TFLOP/s against N per provider for the sweeps, bars where a shape has a
    single N (the DiffCLIP shapes)."""
    plt = _pyplot()
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    groups = sorted({(r["shape"], r["dtype"], r["mode"]) for r in rows if r["ms"]})
    if not groups:
        return
    cols = min(4, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, (shape, dtype, mode) in zip(axes.flat, groups):
        sel = [r for r in rows if (r["shape"], r["dtype"], r["mode"]) == (shape, dtype, mode) and r["tflops"]]
        ns = sorted({r["N"] for r in sel})
        if len(ns) == 1:
            provs = [p for p in providers if any(r["provider"] == p for r in sel)]
            vals = [max(r["tflops"] for r in sel if r["provider"] == p) for p in provs]
            ax.bar(provs, vals, color=[f"C{providers.index(p)}" for p in provs])
            b = sel[0]
            ax.set_title(f"{shape} B={b['B']} H={b['H']} N={b['N']} d={b['d']}\n{dtype} {mode}", fontsize=9)
        else:
            for prov in providers:
                pts = sorted((r["N"], r["tflops"]) for r in sel if r["provider"] == prov)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov, color=f"C{providers.index(prov)}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N")
            ax.legend(fontsize=7)
            ax.set_title(f"{shape} {dtype} {mode}", fontsize=9)
        ax.set_ylabel("TFLOP/s")
    fig.suptitle(f"diff_attn on {device}" if device else "diff_attn", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_model(rows, path, device=""):
    plt = _pyplot()
    tasks = [t for t in ("encode_image", "encode_text", "train_step") if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sel = [r for r in rows if r["task"] == task and r["ms"]]
        labels = [f"{r['backend']}\n{r['dtype']} B{r['batch']}" for r in sel]
        ax.bar(range(len(sel)), [r["per_s"] for r in sel])
        ax.set_xticks(range(len(sel)), labels, rotation=90, fontsize=7)
        ax.set_ylabel("items/s")
        ax.set_title(task)
    fig.suptitle(f"DiffCLIP ViT-B/16 on {device}" if device else "DiffCLIP", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    src, dst = (argv if argv is not None else sys.argv[1:])[:2]
    with open(src) as f:
        data = json.load(f)
    (plot_model if data.get("benchmark") == "model" else plot_op)(data["rows"], dst, data.get("device", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
