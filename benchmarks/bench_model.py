"""End-to-end benchmark: DiffCLIP ViT-B/16 (random weights) per attention backend, and plain CLIP.

    python -m benchmarks.bench_model --json out.json --plot out.png      # GPU
    python -m benchmarks.bench_model --smoke --json /tmp/smoke.json      # tiny model on CPU

Rows: encode_image at batch 1/32/256 and encode_text at batch 256 (inference, bf16 and fp16), and one training
step (forward + backward of the CLIP contrastive loss, no optimizer) per backend; images/s or texts/s, step time,
peak memory. The "plain-clip" row is the same widths with standard SDPA attention. "sdpa+compile" and
"triton+compile" compile the encoders (fullgraph) on top of those backends. Each backend's embeddings are checked
against the eager backend's before timing.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from . import common

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# "+compile": torch.compile(fullgraph=True) of the whole encoder / training step on top of that backend (Inductor on
# CUDA; aot_eager in the CPU smoke run), so users see what compiling buys on top of the kernel.
BACKENDS = ("eager", "sdpa", "triton", "sdpa+compile", "triton+compile")


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
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)

    on_cpu = common.setup_interpreter()
    device = torch.device("cpu" if on_cpu else "cuda")
    from diffclip import DiffCLIP, DiffCLIPConfig

    from .plain_clip import plain_clip

    if args.smoke:
        config = DiffCLIPConfig(embed_dim=32, vision_width=64, vision_img_size=32, vision_patch_size=16,
                                vision_depth=1, vision_heads=4, context_length=16, vocab_size=100, text_width=64,
                                text_heads=4, text_layers=1)
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
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        # One set of DiffCLIP weights whose backend is switched per row, and the plain-CLIP reference model.
        base = DiffCLIP(config, attn_backend="eager").to(device, dtype).eval()
        plain = plain_clip(config).to(device, dtype).eval()
        check_img, check_txt = make_inputs(config, 2, device, dtype)
        with torch.no_grad():
            ref = base.set_attn_backend("eager")(check_img, check_txt)
        for name in [*backends, "plain-clip"]:
            model = plain if name == "plain-clip" else base
            row_base = dict(model=name if name == "plain-clip" else "diffclip", backend=name, dtype=dtype_name)
            err, skipped = None, None
            attn, compiled = name.split("+")[0], name.endswith("+compile")
            encode_image, encode_text, forward = model.encode_image, model.encode_text, model
            try:
                if compiled:
                    torch._dynamo.reset()
                    opts = dict(fullgraph=True, backend="aot_eager" if on_cpu else "inductor")
                    encode_image, encode_text = (torch.compile(f, **opts) for f in (encode_image, encode_text))
                    forward = torch.compile(model, **opts)
                if name != "plain-clip":
                    model.set_attn_backend(attn)
                    with torch.no_grad():
                        out = model(check_img, check_txt)
                    err = max(((out[k].float() - ref[k].float()).norm() / ref[k].float().norm()).item()
                              for k in ("image_embed", "text_embed"))
                    limit = 1e-4 if dtype == torch.float32 else 3e-2
                    if not err <= limit:
                        skipped = f"embedding check vs eager failed: rel err {err:.2e} > {limit:.0e}"
            except Exception as e:
                skipped = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            tasks = [("encode_image", b) for b in image_batches] + [("encode_text", text_batch),
                                                                   ("train_step", train_batch)]
            for task, batch in tasks:
                row = dict(row_base, task=task, batch=batch, ms=None, per_s=None, peak_mb=None, rel_err=err,
                           skipped=skipped)
                if skipped is None:
                    try:
                        image, text = make_inputs(config, batch, device, dtype)
                        if task == "encode_image":
                            def step():
                                with torch.no_grad():
                                    return encode_image(image)
                        elif task == "encode_text":
                            def step():
                                with torch.no_grad():
                                    return encode_text(text)
                        else:
                            model.train()

                            def step():
                                contrastive_loss(forward(image, text)).backward()
                        row["ms"] = common.bench_ms(step, grad_to_none=list(model.parameters()))
                        row["per_s"] = batch / (row["ms"] * 1e-3)
                        row["peak_mb"] = common.peak_memory_mb(step)
                        model.eval()
                        model.zero_grad(set_to_none=True)
                    except torch.cuda.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        torch.cuda.empty_cache()
                    except Exception as e:
                        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                status = f"{row['ms']:.2f} ms" if row["ms"] else f"skipped: {row['skipped']}"
                print(f"{dtype_name} {name:10} {task:12} B={batch:<4} {status}", flush=True)
        del plain, base
    print()
    common.print_table(rows, [("model", "model", "10"), ("backend", "backend", "14"), ("dtype", "dtype", "5"),
                              ("task", "task", "12"), ("batch", "batch", "d"), ("ms", "ms", ".2f"),
                              ("per_s", "items/s", ".0f"), ("peak_mb", "peak MB", ".0f")])
    extra = {"benchmark": "model", "smoke": args.smoke, "config": config.to_dict()}
    if args.json:
        common.write_json(args.json, env, rows, extra)
    if args.plot:
        plot(rows, args.plot, env["device"])
    return 0


def plot(rows, path, device=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


if __name__ == "__main__":
    sys.exit(main())
