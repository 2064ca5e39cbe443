"""Unreadable images on every route of `diffclip eval` / `embed` are one line naming the file, exit status 2:
from DataLoader workers, from CLIP Benchmark's COCO and webdataset readers, and under torchrun from the one
rank that saw it while the others end quietly (no gloo "Connection closed by peer")."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from distrun import ROOT
from refdata import TINY_CKPT, need

from diffclip.cli import main


def _png_bytes(seed, size=(40, 50)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _truncated(seed=0):
    data = _png_bytes(seed, (120, 120))
    return data[: len(data) // 2]


def _bomb():
    """A PNG header claiming 20000 x 20000 pixels (over twice PIL's limit: DecompressionBombError at open)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _one_error_line(err, *words):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("diffclip: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def _args(*a):
    return list(a) + ["--checkpoint", need(TINY_CKPT), "--backend", "eager", "--batch-size", "2"]


def _class_tree(root, bad_name, bad_bytes):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for j in range(3):
            (root / c / f"{j}.png").write_bytes(_png_bytes(10 * ord(c) + j))
    (root / "b" / bad_name).write_bytes(bad_bytes)


def test_truncated_image_in_a_worker_is_one_line(tmp_path, capsys):
    _class_tree(tmp_path / "data", "zz.png", _truncated())
    assert main(_args("eval", "zeroshot", "--data", str(tmp_path / "data"), "--num-workers", "2")) == 2
    _one_error_line(capsys.readouterr().err, "zz.png")


def _coco(root, bad=None):
    (root / "val2014").mkdir(parents=True)
    images, annotations = [], []
    for n, img_id in enumerate([5, 2, 9]):
        data = bad if (bad is not None and n == 1) else _png_bytes(n)
        (root / "val2014" / f"{img_id}.png").write_bytes(data)
        images.append({"id": img_id, "file_name": f"{img_id}.png"})
        annotations.append({"id": img_id, "image_id": img_id, "caption": f"caption {n}"})
    (root / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


@pytest.mark.parametrize("bad,words", [(_truncated(), "cannot read image"), (_bomb(), "decompression bomb")],
                         ids=["truncated", "bomb"])
@pytest.mark.parametrize("workers", ["0", "2"])
def test_bad_coco_image_is_one_line_naming_the_file(tmp_path, capsys, bad, words, workers):
    pytest.importorskip("clip_benchmark")
    root = _coco(tmp_path / "coco", bad)
    assert main(_args("eval", "retrieval", "--dataset", "mscoco_captions", "--data-root", str(root),
                      "--num-workers", workers)) == 2
    _one_error_line(capsys.readouterr().err, words, os.path.join("val2014", "2.png"))


def _wds(root, n_shards=2, bad=None):
    (root / "test").mkdir(parents=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tar:
            for _ in range(3):
                data = bad if (bad is not None and k == 4) else _png_bytes(k)
                for ext, payload in (("png", data), ("cls", str(k % 2).encode())):
                    info = tarfile.TarInfo(f"s{k:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                k += 1
    (root / "test" / "nshards.txt").write_text(f"{n_shards}\n")
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    return root


@pytest.mark.parametrize("workers", ["0", "2"])
def test_undecodable_webdataset_image_is_one_line(tmp_path, capsys, workers):
    pytest.importorskip("clip_benchmark")
    root = _wds(tmp_path / "wds", bad=b"\x89PNG\r\n\x1a\nbroken")
    assert main(_args("eval", "zeroshot", "--dataset", "wds/t", "--data-root", str(root),
                      "--num-workers", workers)) == 2
    _one_error_line(capsys.readouterr().err, "s0004")


def test_more_workers_than_webdataset_shards_runs_with_a_note(tmp_path, capsys):
    pytest.importorskip("clip_benchmark")
    root = _wds(tmp_path / "wds", n_shards=2)
    assert main(_args("eval", "zeroshot", "--dataset", "wds/t", "--data-root", str(root), "--num-workers", "4",
                      "--json", str(tmp_path / "z.json"))) == 0
    assert "has 2 shard(s): 2 loader worker(s) instead of --num-workers 4" in capsys.readouterr().err
    assert json.loads((tmp_path / "z.json").read_text())["metrics"]["acc1"] is not None


def _torchrun(args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=os.path.join(str(cwd), "hf-home"), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "diffclip"]
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["eval", "embed"])
def test_torchrun_bad_image_on_one_rank_is_one_line_from_that_rank(tmp_path, command):
    """5 images, one truncated (rank 1's: index 3 of the sorted listing): one error line naming it, no gloo
    error from rank 0, and the failing rank's exit status 2; nothing half-written in --out."""
    d = tmp_path / "data" / "c"
    d.mkdir(parents=True)
    for j in range(5):
        (d / f"{j}.png").write_bytes(_truncated() if j == 3 else _png_bytes(j))
    if command == "eval":
        args = _args("eval", "zeroshot", "--data", str(tmp_path / "data"))
    else:
        args = _args("embed", str(d), "--out", str(tmp_path / "out"))
    proc = _torchrun(args, tmp_path)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "diffclip: error:" in ln]
    assert len(errors) == 1 and "3.png" in errors[0], proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "gloo" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr or "exit code 2" in proc.stderr or "exitcode: 2" in proc.stderr, \
        proc.stderr[-3000:]
    if command == "embed":
        assert sorted(os.listdir(tmp_path / "out")) == []
