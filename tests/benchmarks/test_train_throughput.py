"""The training-throughput benchmark's smoke mode on CPU: synthetic shards, one process per row, JSON rows."""

import json
import math

import torch

from benchmarks import train_throughput


def test_smoke_writes_rows(tmp_path):
    out = tmp_path / "train.json"
    assert train_throughput.main(["--smoke", "--json", str(out), "--rows", "sdpa,plain-clip,triton"]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "train_throughput" and data["smoke"] is True and "torch" in data
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["sdpa", "plain-clip", "triton"]
    for name in ("sdpa", "plain-clip"):
        r = rows[name]
        assert r["timed_steps"] == 2 and r["images_per_s"] > 0 and r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]) and r["skipped"] == 0
    if not torch.cuda.is_available():
        assert "needs CUDA" in rows["triton"]["skipped"]


def test_synthetic_shards_follow_img2dataset_layout(tmp_path):
    from diffclip.training import wds

    paths = train_throughput.make_shards(str(tmp_path), samples=10, shards=3, size=32)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert wds.img2dataset_count(paths) == 10
    errors = []
    first = list(wds.shard_samples(paths[0], errors))
    assert len(first) == 4 and not errors and {"jpg", "txt", "__key__"} <= set(first[0])
