"""Training throughput of `diffclip train`'s loop: ViT-B/16, per attention backend, and plain CLIP on the same loop.

    python -m benchmarks.train_throughput --json out.json            # GPU: 100 steps, B=128, bf16, per row
    python -m benchmarks.train_throughput --smoke --json /tmp/t.json  # tiny models, 3 steps, on CPU

Rows: DiffCLIP with the `triton`, `sdpa` and `eager` backends, and `plain-clip` (open_clip's ViT-B-16, random
init, standard attention). Every row runs in its own process (fresh peak-memory counter, no shared caches) over
the same synthetic img2dataset-style shards (written first, JPEG + txt), through the trainer's own parts: the
webdataset loader with DataLoader workers (decoding, RandomResizedCrop), AdamW, ClipLoss, autocast, the logit
scale clamp (`diffclip.training.loop.Trainer.step`). Per row: images/s over the timed steps (after `--warmup`
steps: autotuning and allocator warm-up), the median step time with min/max, the median time waiting for data
(if it is not ~0 the row is input-bound and the images/s say so), peak GPU memory, first and last loss. The JSON
is rewritten after every row.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

ROWS = ("triton", "sdpa", "eager", "plain-clip")
WORDS = ("red", "green", "blue", "dog", "cat", "car", "tree", "house", "boat", "bird", "small", "large", "photo")


def make_shards(folder: str, samples: int, shards: int, size: int, seed: int = 0) -> list[str]:
    """img2dataset layout: NNNNN.tar holding KEY.jpg + KEY.txt, and NNNNN_stats.json. Smooth images with noise
    (a realistic JPEG size and decode cost, not a constant colour)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths, yy, xx = [], *np.mgrid[0:size, 0:size] / size
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        n = len(range(s, samples, shards))
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                c0, c1 = rng.random(3) * 255, rng.random(3) * 255
                img = c0 * (1 - xx[..., None]) + c1 * yy[..., None] + rng.normal(0, 12, (size, size, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(buf, format="JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, 6)).encode()
                for ext, payload in (("jpg", buf.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{s:05d}{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"successes": n}, f)
        paths.append(path)
    return paths


class PlainClip:
    """open_clip's CLIP behind DiffCLIP's forward contract ({image_embed, text_embed, logit_scale})."""

    @staticmethod
    def build(smoke: bool):
        import open_clip
        import torch

        if smoke:
            from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

            clip = CLIP(32, CLIPVisionCfg(layers=1, width=64, head_width=16, patch_size=16, image_size=32),
                        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=1))
        else:
            clip = open_clip.create_model("ViT-B-16", pretrained=None)

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.clip = clip
                self.logit_scale = clip.logit_scale  # the same Parameter: the trainer clamps model.logit_scale

            def forward(self, image, text):
                return {"image_embed": self.clip.encode_image(image), "text_embed": self.clip.encode_text(text),
                        "logit_scale": self.clip.logit_scale.exp()}

        return Wrapped()


def smoke_config():
    from diffclip import DiffCLIPConfig

    return DiffCLIPConfig(embed_dim=32, vision_width=64, vision_img_size=32, vision_patch_size=16, vision_depth=1,
                          vision_heads=4, context_length=77, text_width=64, text_heads=4, text_layers=1)


def run_row(row: str, a) -> dict:
    """One row, in this process: `a.steps` optimizer steps; returns the measurements."""
    import statistics

    import torch
    from open_clip.loss import ClipLoss

    from diffclip import DiffCLIP, DiffCLIPConfig
    from diffclip.text import get_tokenizer
    from diffclip.training import loop, optim, samples, wds

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if row == "plain-clip":
        model = PlainClip.build(a.smoke)
        size = 32 if a.smoke else 224
    else:
        config = smoke_config() if a.smoke else DiffCLIPConfig.vit_b16()
        model = DiffCLIP(config, attn_backend=row)
        size = config.vision_img_size
    model.to(device).train()
    if a.grad_checkpointing and row != "plain-clip":
        from diffclip.training.modeling import enable_grad_checkpointing

        enable_grad_checkpointing(model)
    pre = samples.Preprocess(samples.train_transform(size), get_tokenizer(77), seed=0)
    shards = wds.expand_shards(a.data)
    loader, source = wds.loader(shards, pre, rank=0, world=1, batch_size=a.batch_size, workers=a.workers, seed=0,
                                strict=False, positions=None, start_position=0, global_batch=a.batch_size,
                                accum=1)
    optimizer = optim.build_optimizer(model, 5e-4, 0.5)
    precision = a.precision if device.type == "cuda" else "fp32"
    trainer = loop.Trainer(model=model, fwd=model, ddp=None, optimizer=optimizer,
                           scaler=optim.build_scaler(precision, device), loss_fn=ClipLoss(), device=device, rank=0,
                           world=1, precision=precision, accum=1, strict=False, monitor=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    it = iter(loader)
    steps_ms, wait_ms, losses, images = [], [], [], 0
    for step in range(a.steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        loss, n = trainer.step([batch], optim.cosine_lr(step, 5e-4, 10, a.steps))
        losses.append(float(loss))  # a host sync: the step is complete when it is timed
        t2 = time.perf_counter()
        if step >= a.warmup:
            steps_ms.append((t2 - t0) * 1e3)
            wait_ms.append((t1 - t0) * 1e3)
            images += n
    return {
        "row": row, "batch": a.batch_size, "precision": precision, "steps": a.steps, "timed_steps": len(steps_ms),
        "images_per_s": images / (sum(steps_ms) / 1e3),
        "step_ms": statistics.median(steps_ms), "step_ms_min": min(steps_ms), "step_ms_max": max(steps_ms),
        "data_wait_ms": statistics.median(wait_ms),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss_first": losses[0], "loss_last": losses[-1], "skipped": trainer.skipped,
        "grad_checkpointing": bool(a.grad_checkpointing and row != "plain-clip"),
    }


def skip_reason(row: str) -> str | None:
    import torch

    if row == "triton" and not torch.cuda.is_available():
        return "the triton backend needs CUDA (CPU only under Triton's interpreter, far too slow to time)"
    return None


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny models, 3 steps, CPU-friendly")
    p.add_argument("--json", help="results file (rewritten after every row)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--steps", type=int, help="optimizer steps per row (default 100; smoke 3)")
    p.add_argument("--warmup", type=int, help="untimed first steps (default 10; smoke 1)")
    p.add_argument("--batch-size", type=int, help="per step (default 128; smoke 4)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="on CUDA (CPU: fp32)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: min(12, cores - 2); smoke 1)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--data", help="existing shards (pattern/folder); default: synthetic ones in a temp folder")
    p.add_argument("--row-timeout-s", type=int, default=240)
    p.add_argument("--child", help=argparse.SUPPRESS)  # run one row and write it to --child-out
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = a.steps or (3 if a.smoke else 100)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 10)
    a.batch_size = a.batch_size or (4 if a.smoke else 128)
    a.workers = a.workers if a.workers is not None else (1 if a.smoke else max(1, min(12, (os.cpu_count() or 4) - 2)))
    if a.warmup >= a.steps:
        p.error("--warmup must be smaller than --steps")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        with open(a.child_out, "w") as f:
            json.dump(run_row(a.child, a), f)
        return 0
    from . import common

    rows_wanted = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = set(rows_wanted) - set(ROWS)
    if unknown:
        print(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}", file=sys.stderr)
        return 2
    env = common.environment()
    with tempfile.TemporaryDirectory() as tmp:
        if a.data is None:
            n = max(8 * a.batch_size, 64)
            a.data = os.path.join(tmp, "shards")
            t0 = time.perf_counter()
            make_shards(a.data, n, shards=max(1, a.workers), size=64 if a.smoke else 256)
            print(f"wrote {n} synthetic samples in {time.perf_counter() - t0:.1f} s")
        rows = []
        for row in rows_wanted:
            result = {"row": row, "skipped": skip_reason(row)}
            if result["skipped"] is None:
                out = os.path.join(tmp, f"{row}.json")
                cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--child", row, "--child-out", out,
                       "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
                       "--precision", a.precision, "--workers", str(a.workers), "--data", a.data] + \
                    (["--smoke"] if a.smoke else []) + (["--grad-checkpointing"] if a.grad_checkpointing else [])
                try:
                    proc = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True,
                                          timeout=a.row_timeout_s)
                    if proc.returncode == 0:
                        with open(out) as f:
                            result = json.load(f)
                    else:
                        result["error"] = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                except subprocess.TimeoutExpired:
                    result["error"] = [f"ran past --row-timeout-s {a.row_timeout_s}"]
            rows.append(result)
            print(json.dumps(result))
            if a.json:
                common.write_json(a.json, env, rows, {"benchmark": "train_throughput", "smoke": a.smoke})
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
