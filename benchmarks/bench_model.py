"""End-to-end benchmark: DiffCLIP ViT-B/16 (random weights) per attention backend, and plain CLIP.

    python -m benchmarks.bench_model --json out.json --plot out.png      # GPU
    python -m benchmarks.bench_model --smoke --json /tmp/smoke.json      # tiny model on CPU

Rows: encode_image at batch 1/32/256 and encode_text at batch 256 (inference, bf16 and fp16), and one training
step (forward + backward of the CLIP contrastive loss, no optimizer) per backend; images/s or texts/s, step time,
peak memory; median, min and max of at least 10 timed runs. The "plain-clip" row is the same widths with standard
SDPA attention (see NOTE). "+compile" rows compile the encoder or model per row (see BACKENDS). Each row's
embeddings are checked against the eager backend's (plain CLIP: its uncompiled self) before timing. The JSON is
rewritten after every row.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import common

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# "+compile": torch.compile(fullgraph=True, dynamic=False) of the encoder / model forward on top of that backend
# (Inductor on CUDA; aot_eager in the CPU smoke run), compiled afresh for every (task, batch) row, so no row runs a
# graph compiled for another batch (or a dynamic-shape one), and checked: the compiled callable's embeddings are
# compared with the eager backend's before timing, and a row that ran no compiled graph is not timed.
BACKENDS = ("eager", "sdpa", "triton", "sdpa+compile", "triton+compile", "plain-clip", "plain-clip+compile")
NOTE = ("plain-clip: the same widths and depths with one packed qkv projection (Linear(width, 3*width)) and one "
        "SDPA call per layer; DiffCLIP has three projections (q, k, v: three GEMMs and their gradients), the "
        "lambda re-parametrisation and the per-head RMS norm, so a plain-clip ratio includes those launches, not "
        "only the attention.")


def smoke_config():
    """The tiny DiffCLIP of the CPU smoke run."""
    from diffclip import DiffCLIPConfig

    return DiffCLIPConfig(embed_dim=32, vision_width=64, vision_img_size=32, vision_patch_size=16, vision_depth=1,
                          vision_heads=4, context_length=16, vocab_size=100, text_width=64, text_heads=4,
                          text_layers=1)


def contrastive_loss(out):
    img = F.normalize(out["image_embed"].float(), dim=-1)
    txt = F.normalize(out["text_embed"].float(), dim=-1)
    logits = out["logit_scale"].float() * img @ txt.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def make_inputs(config, batch, device, dtype):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, config.vision_img_size, config.vision_img_size, generator=g).to(device, dtype)
    text = torch.randint(1, config.vocab_size - 1, (batch, config.context_length), generator=g)
    text[:, -1] = config.vocab_size - 1  # end token = largest id
    return image, text.to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--image-batches", default="1,32,256")
    p.add_argument("--text-batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--smoke", action="store_true", help="tiny model, fp32, CPU (Triton interpreter)")
    p.add_argument("--budget-s", type=float, help="stop starting rows after this many seconds; the rows not run "
                   "are recorded as skipped (a bounded run on lent device time)")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)

    on_cpu = common.setup_interpreter()
    device = torch.device("cpu" if on_cpu else "cuda")
    from diffclip import DiffCLIP, DiffCLIPConfig

    from .plain_clip import plain_clip

    if args.smoke:
        config = smoke_config()
        dtypes, image_batches, text_batch, train_batch = ["fp32"], [2], 2, 2
    else:
        if on_cpu:
            p.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
        config = DiffCLIPConfig.vit_b16()
        dtypes = [t for t in args.dtypes.split(",") if t]
        image_batches = [int(b) for b in args.image_batches.split(",")]
        text_batch, train_batch = args.text_batch, args.train_batch
    backends = [b for b in args.backends.split(",") if b]
    env = common.environment()
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}", flush=True)

    torch.manual_seed(0)
    rows = []
    extra = {"benchmark": "model", "smoke": args.smoke, "config": config.to_dict(), "note": NOTE,
             "min_samples": common.MIN_SAMPLES, "interrupted": False}

    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s

    def save():
        if args.json:
            common.write_json(args.json, env, rows, extra)

    try:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            # One set of DiffCLIP weights whose backend is switched per row, and the plain-CLIP reference model.
            base = DiffCLIP(config, attn_backend="eager").to(device, dtype).eval()
            plain = plain_clip(config).to(device, dtype).eval()
            tasks = [("encode_image", b) for b in image_batches] + [("encode_text", text_batch),
                                                                   ("train_step", train_batch)]
            for name in backends:
                for task, batch in tasks:
                    if deadline is not None and time.monotonic() > deadline:
                        row = dict(model="plain-clip" if name.startswith("plain-clip") else "diffclip",
                                   backend=name, task=task, batch=batch, ms=None,
                                   skipped=f"time budget ({args.budget_s:g} s) spent")
                    else:
                        row = run_row(name, task, batch, base, plain, config, device, dtype)
                    rows.append(dict(row, dtype=dtype_name))
                    status = (f"{row['ms']:.2f} ms [{row['ms_min']:.2f}, {row['ms_max']:.2f}] n={row['n']}"
                              if row.get("ms") else f"skipped: {row['skipped']}")
                    print(f"{dtype_name} {name:18} {task:12} B={batch:<4} {status}", flush=True)
                    save()
            del plain, base
    except KeyboardInterrupt:  # device_check's `timeout -s INT`: keep what was measured
        extra["interrupted"] = True
        print("!! interrupted: the table below has the rows measured so far", flush=True)
    save()
    print()
    common.print_table(rows, [("model", "model", "10"), ("backend", "backend", "18"), ("dtype", "dtype", "5"),
                              ("task", "task", "12"), ("batch", "batch", "d"), ("ms", "ms", ".2f"),
                              ("ms_min", "min", ".2f"), ("ms_max", "max", ".2f"), ("per_s", "items/s", ".0f"),
                              ("peak_mb", "peak MB", ".0f")])
    print(f"note: {NOTE}")
    if args.plot:
        from .plots import plot_model

        plot_model(rows, args.plot, env["device"])
    return 130 if extra["interrupted"] else 0


def _embed(task, fn, image, text):
    """The embeddings a row's callable produces, for the check against the eager backend."""
    if task == "encode_image":
        return {"image_embed": fn(image)}
    if task == "encode_text":
        return {"text_embed": fn(text)}
    out = fn(image, text)
    return {k: out[k] for k in ("image_embed", "text_embed")}


def run_row(name, task, batch, base, plain, config, device, dtype):
    """One (backend, task, batch) row: check, then time. A failure is recorded as the row's reason."""
    from .providers import Compiled

    is_plain = name.startswith("plain-clip")
    model = plain if is_plain else base
    compiled = name.endswith("+compile")
    row = dict(model="plain-clip" if is_plain else "diffclip", backend=name, task=task, batch=batch, ms=None,
               ms_min=None, ms_max=None, n=None, per_s=None, peak_mb=None, rel_err=None, skipped=None)
    try:
        image, text = make_inputs(config, batch, device, dtype)
        train = task == "train_step"
        fn = {"encode_image": model.encode_image, "encode_text": model.encode_text, "train_step": model}[task]
        # The reference: the eager backend (DiffCLIP) or the uncompiled model (plain CLIP), eval mode, no grad.
        if not is_plain:
            model.set_attn_backend("eager")
        with torch.no_grad():
            ref = _embed(task, fn, image, text)
            if not is_plain:
                model.set_attn_backend(name.split("+")[0])
        if compiled:
            torch._dynamo.reset()
            fn = Compiled(fn, fullgraph=True)
        model.train(train)
        with torch.set_grad_enabled(train):
            out = _embed(task, fn, image, text)  # in the timed step's mode: the check compiles the timed graph
        row["rel_err"] = max(((out[k].float() - ref[k].float()).norm() / ref[k].float().norm()).item() for k in ref)
        limit = 1e-4 if dtype == torch.float32 else 3e-2
        if not row["rel_err"] <= limit:
            row["skipped"] = f"embedding check vs eager failed: rel err {row['rel_err']:.2e} > {limit:.0e}"
            return row
        if compiled and (fn.graphs == 0 or fn.runs == 0):
            row["skipped"] = "torch.compile ran no compiled graph (eager fallback): not timed"
            return row
        graphs = fn.graphs if compiled else 0
        if task == "encode_image":
            def step():
                with torch.no_grad():
                    return fn(image)
        elif task == "encode_text":
            def step():
                with torch.no_grad():
                    return fn(text)
        else:
            def step():
                contrastive_loss(fn(image, text)).backward()
        t = common.bench(step, grad_to_none=list(model.parameters()))
        if compiled and fn.graphs != graphs:
            row["skipped"] = f"torch.compile recompiled while timing ({graphs} -> {fn.graphs} graphs)"
            return row
        row.update(ms=t["ms"], ms_min=t["ms_min"], ms_max=t["ms_max"], n=t["n"], per_s=batch / (t["ms"] * 1e-3))
        row["peak_mb"] = common.peak_memory_mb(step)
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as e:
        row["skipped"] = common.reason(e)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
