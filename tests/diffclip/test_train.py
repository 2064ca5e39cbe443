"""`diffclip train` on CPU: learning, DDP equivalence (2 gloo processes), exact resume, corrupt samples, atomic
saves, loading the result, webdataset shards, validation, usage errors. Tiny model, data written by the tests."""

import json
import os

import pytest
import torch
from distrun import run_diffclip
from tolerances import TRAIN_GRAD_REL, TRAIN_PARAM_ATOL
from traindata import TINY_TRAIN, write_config, write_csv, write_shards

import diffclip
from diffclip.cli import main
from diffclip.training import checkpoint_io, optim


def train(tmp_path, out, *extra, data="train.csv", capsys=None):
    """In-process `diffclip train` (one process); returns (exit status, stderr lines when capsys is given)."""
    argv = ["train", "--train-data", str(tmp_path / data), "--out", str(tmp_path / out), "--workers", "0",
            "--log-every", "1", "--lr", "2e-3", "--attn-backend", "sdpa", *extra]
    if "--init" not in extra and "--config" not in extra:
        argv += ["--config", write_config(tmp_path)]
    rc = main(argv)
    err = capsys.readouterr().err if capsys else ""
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def log(tmp_path, out):
    with open(tmp_path / out / "log.jsonl") as f:
        return [json.loads(ln) for ln in f]


def losses(tmp_path, out):
    return {r["step"]: r["loss"] for r in log(tmp_path, out) if "loss" in r}


def recall_at_1(model, preprocess, tokenizer, folder):
    import csv

    from PIL import Image

    with open(folder / "train.csv") as f:
        rows = list(csv.DictReader(f))
    images = torch.stack([preprocess(Image.open(folder / r["image"])) for r in rows])
    with torch.no_grad():
        out = model(images, tokenizer([r["caption"] for r in rows]))
    sim = torch.nn.functional.normalize(out["image_embed"], dim=-1) @ \
        torch.nn.functional.normalize(out["text_embed"], dim=-1).T
    return float((sim.argmax(1) == torch.arange(len(rows))).float().mean())


def test_loss_falls_recall_rises_and_the_result_loads(tmp_path):
    write_csv(tmp_path)
    torch.manual_seed(3)
    init = diffclip.DiffCLIP(diffclip.DiffCLIPConfig(**TINY_TRAIN), attn_backend="sdpa")
    torch.save({"state_dict": {"module." + k: v for k, v in init.state_dict().items()}}, tmp_path / "init.pt")
    before = recall_at_1(*diffclip.load(str(tmp_path / "init.pt"), attn_backend="sdpa"), tmp_path)
    rc, _ = train(tmp_path, "run", "--init", str(tmp_path / "init.pt"), "--steps", "80", "--batch-size", "16",
                  "--wd", "0.1", "--lr", "1e-3", "--warmup", "10")  # seeds 0, 1, 3: recall 1.0, 1.0, 0.94
    assert rc == 0
    rows = log(tmp_path, "run")
    assert [r["step"] for r in rows] == list(range(1, 81))
    assert all({"step", "loss", "lr", "images_per_s"} <= set(r) for r in rows)
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    after = recall_at_1(*diffclip.load(str(tmp_path / "run" / "checkpoint_last.pt"), attn_backend="sdpa"), tmp_path)
    assert before <= 0.25 and after >= 0.75, (before, after)


def _state(path):
    """(model weights, {parameter name: gradient of the first step})."""
    ck = checkpoint_io.read(str(path))
    model = diffclip.DiffCLIP(ck["config"], attn_backend="sdpa")
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optim.param_groups(model, 0.5) for p in g["params"]]  # optimizer indices
    grads = {order[i]: s["exp_avg"] / 0.1 for i, s in ck["optimizer"]["state"].items()}  # first step: (1-β1)·g
    return ck["model_state"], grads


def _assert_same_step(a_path, b_path):
    (pa, ga), (pb, gb) = _state(a_path), _state(b_path)
    assert pa.keys() == pb.keys() and ga.keys() == gb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=TRAIN_PARAM_ATOL, msg=k)
    for k in ga:
        a, b = ga[k], gb[k]
        if k.endswith("qkv_proj.bias"):  # its middle third, the key bias: exactly zero in exact arithmetic
            (aq, ak, av), (bq, bk, bv) = a.chunk(3), b.chunk(3)  # (softmax ignores a per-row constant)
            assert ak.abs().max() < 1e-6 and bk.abs().max() < 1e-6
            a, b = torch.cat([aq, av]), torch.cat([bq, bv])
        err, scale = (a - b).abs().max().item(), a.abs().max().item()
        assert err <= TRAIN_GRAD_REL * scale, (k, err, scale)


# Adam's first step moves every parameter by ~lr·sign(g). Some gradients are exactly zero in exact arithmetic (the
# key-projection bias: softmax ignores a per-row constant), so in fp32 they are rounding noise whose sign depends on
# the summation order; eps = 1e-3 keeps such noise from being scaled up to ±lr, so parameters can be compared at
# fp32 tolerance. The gradients themselves are compared as well.
ONE_STEP = ("--steps", "1", "--lr", "1e-3", "--eps", "1e-3")


def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path):
    write_csv(tmp_path)
    common = ["train", "--train-data", "train.csv", "--config", write_config(tmp_path), "--workers", "0",
              "--attn-backend", "sdpa", "--log-every", "1", *ONE_STEP]
    run_diffclip(common + ["--out", "two", "--batch-size", "4"], cwd=tmp_path, procs=2)
    run_diffclip(common + ["--out", "one", "--batch-size", "8"], cwd=tmp_path, procs=1)
    _assert_same_step(tmp_path / "one" / "checkpoint_last.pt", tmp_path / "two" / "checkpoint_last.pt")
    assert log(tmp_path, "two")[0]["loss"] == pytest.approx(log(tmp_path, "one")[0]["loss"], rel=1e-6)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    write_csv(tmp_path)
    assert train(tmp_path, "full", *ONE_STEP, "--batch-size", "8")[0] == 0
    assert train(tmp_path, "accum", *ONE_STEP, "--batch-size", "4", "--accum-freq", "2")[0] == 0
    _assert_same_step(tmp_path / "full" / "checkpoint_last.pt", tmp_path / "accum" / "checkpoint_last.pt")
    assert losses(tmp_path, "accum")[1] == pytest.approx(losses(tmp_path, "full")[1], rel=1e-6)


@pytest.mark.parametrize("kind", ["csv", "webdataset"])
def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, kind):
    """6 rows per step over 16 rows: steps cross epoch boundaries; 2 workers decode alternate batches."""
    if kind == "csv":
        write_csv(tmp_path)
        data = "train.csv"
    else:
        write_shards(tmp_path / "shards", shards=2)
        data = "shards"
    common = ("--steps", "7", "--batch-size", "6", "--workers", "2")
    assert train(tmp_path, "a", *common, "--save-every", "3", data=data)[0] == 0
    assert sorted(p for p in os.listdir(tmp_path / "a") if p.endswith(".pt")) == [
        "checkpoint_last.pt", "checkpoint_step3.pt", "checkpoint_step6.pt"]
    assert train(tmp_path, "b", *common, "--resume", str(tmp_path / "a" / "checkpoint_step3.pt"), data=data)[0] == 0
    full, resumed = losses(tmp_path, "a"), losses(tmp_path, "b")
    assert sorted(resumed) == [4, 5, 6, 7]
    assert [resumed[s] for s in resumed] == [full[s] for s in resumed]  # bitwise, not approximately
    a, b = _state(tmp_path / "a" / "checkpoint_last.pt")[0], _state(tmp_path / "b" / "checkpoint_last.pt")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_continues_the_same_command(tmp_path):
    write_csv(tmp_path)
    assert train(tmp_path, "run", "--steps", "2", "--batch-size", "4", "--resume", "latest")[0] == 0  # fresh
    assert train(tmp_path, "run", "--steps", "4", "--batch-size", "4", "--resume", "latest")[0] == 0
    assert [r["step"] for r in log(tmp_path, "run")] == [1, 2, 3, 4]
    assert checkpoint_io.read(str(tmp_path / "run" / "checkpoint_last.pt"))["step"] == 4


def test_corrupt_samples_are_skipped_counted_and_strict_stops(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    write_csv(tmp_path, n=13, extra_rows=[("img/broken.png", "red"), ("img/missing.png", "blue"),
                                          ("img/000.png", "")])
    rc, _ = train(tmp_path, "run", "--steps", "2", "--batch-size", "8", capsys=capsys)  # 16 rows: one epoch
    assert rc == 0
    rows = log(tmp_path, "run")
    assert rows[-1]["skipped"] == 3 and rows[-1]["samples_seen"] == 16
    rc, err = train(tmp_path, "strict", "--steps", "2", "--batch-size", "8", "--strict", capsys=capsys)
    # Raised mid-run: the progress bar is on stderr already; the error is its own last line, without traceback.
    errors = [ln for ln in err if "diffclip: error:" in ln]
    assert rc == 2 and "Traceback" not in "".join(err), err
    assert errors == [err[-1]] and err[-1].startswith("diffclip: error: corrupt sample (--strict): row "), err


def test_corrupt_webdataset_members_are_skipped_and_counted(tmp_path):
    write_shards(tmp_path / "shards", n=14, shards=1,
                 extra=[("bad1", {"png": b"garbage", "txt": b"red"}), ("bad2", {"png": b"\x89PNG", "json": b"{}"})])
    # Batches are built from a shuffled stream; 3 steps of 7 need more good samples than one pass (14) holds, so
    # both corrupt samples of the first pass are met, and at most both again in the second.
    assert train(tmp_path, "run", "--steps", "3", "--batch-size", "7", data="shards")[0] == 0
    assert 2 <= log(tmp_path, "run")[-1]["skipped"] <= 4


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    write_csv(tmp_path)
    assert train(tmp_path, "run", "--steps", "1", "--batch-size", "4")[0] == 0
    last = tmp_path / "run" / "checkpoint_last.pt"
    before = last.read_bytes()
    state = checkpoint_io.read(str(last))
    state = {k: v for k, v in state.items() if k not in ("model_state", "config")}

    def dies_halfway(obj, path):
        with open(path, "wb") as f:
            f.write(before[: len(before) // 2])
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(checkpoint_io.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.save(str(tmp_path / "run"), {**state, "step": 2}, keep_step=True)
    assert last.read_bytes() == before
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint_last.pt", "log.jsonl"]
    diffclip.load(str(last))
    # A save killed outright leaves its temporary file; the next start removes it.
    (tmp_path / "run" / ".checkpoint_last.pt.abc123.part").write_bytes(b"partial")
    monkeypatch.undo()
    assert train(tmp_path, "run", "--steps", "2", "--batch-size", "4", "--resume", "latest")[0] == 0
    assert not [p for p in os.listdir(tmp_path / "run") if p.endswith(".part")]


def test_validation_and_grad_checkpointing(tmp_path):
    write_csv(tmp_path)
    rc, _ = train(tmp_path, "ckpt", "--steps", "2", "--batch-size", "8", "--grad-checkpointing",
                  "--val-data", str(tmp_path / "train.csv"), "--val-every", "1")
    assert rc == 0 and train(tmp_path, "plain", "--steps", "2", "--batch-size", "8")[0] == 0
    assert losses(tmp_path, "ckpt") == pytest.approx(losses(tmp_path, "plain"), rel=1e-6)
    val = [r for r in log(tmp_path, "ckpt") if "val/loss" in r]
    assert [r["step"] for r in val] == [1, 2] and val[0]["val/samples"] == 16
    assert 0 <= val[-1]["val/image_to_text_R@1"] <= 1


def test_weight_decay_groups_and_schedule():
    model = diffclip.DiffCLIP(diffclip.DiffCLIPConfig(**TINY_TRAIN), attn_backend="sdpa")
    decay, rest = optim.param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in rest["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "visual.pos_embed", "visual.cls_token",
            "visual.blocks.0.attn.lambda_q1", "visual.blocks.0.attn.diff_norm.weight", "visual.blocks.0.norm1.weight",
            "visual.blocks.0.attn.qkv_proj.bias", "ln_final.weight"} <= no_decay
    assert {names[id(p)] for p in decay["params"]} >= {"visual.blocks.0.attn.qkv_proj.weight", "image_projection",
                                                       "text_projection", "visual.patch_embed.proj.weight"}
    assert decay["weight_decay"] == 0.5 and rest["weight_decay"] == 0.0
    lrs = [optim.cosine_lr(s, 1.0, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0 and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


class _CallsPrint:
    def __reduce__(self):
        return (print, ("PWNED",))


@pytest.mark.parametrize("data,out,args,words", [
    ("train.csv", "new", ["--steps", "0"], "--steps must be >= 1"),
    ("nope.csv", "new", ["--steps", "1"], "training CSV not found"),
    ("empty", "new", ["--steps", "1"], "empty shard list"),
    ("bad.csv", "new", ["--steps", "1"], "has no column 'caption'"),
    ("shards/00000.tar", "new", ["--epochs", "1"], "--train-num-samples"),
    ("train.csv", "new", ["--steps", "1", "--resume", "TMP/nowhere"], "no checkpoint at"),
    ("train.csv", "done", ["--steps", "1"], "already holds a run"),
    ("train.csv", "done", ["--steps", "2", "--resume", "latest", "--config", "vit_b16"], "does not fit the model"),
    ("train.csv", "new", ["--steps", "1", "--init", "TMP/notckpt.pt"], "not a zip-format torch checkpoint"),
    ("train.csv", "new", ["--steps", "1", "--resume", "TMP/hostile.pt"], "globals outside the allow-list"),
    ("train.csv", "new", ["--steps", "1", "--resume", "TMP/modelonly.pt"], "not a `diffclip train` checkpoint"),
], ids=["bad-steps", "missing-csv", "empty-shards", "missing-column", "epochs-unknown-size", "resume-missing",
        "out-holds-run", "checkpoint-does-not-fit", "bad-init", "resume-hostile-pickle", "resume-model-only"])
def test_errors_are_one_line_with_exit_status_2(tmp_path, capsys, data, out, args, words):
    write_csv(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("image,text\na.png,x\n")
    (tmp_path / "notckpt.pt").write_text("hello")
    torch.save({"state_dict": {}, "x": _CallsPrint()}, str(tmp_path / "hostile.pt"))
    write_shards(tmp_path / "shards", n=4, shards=1)
    os.remove(tmp_path / "shards" / "00000_stats.json")  # no sample count: --epochs cannot be converted to steps
    assert train(tmp_path, "done", "--steps", "1", "--batch-size", "4")[0] == 0
    state = torch.load(tmp_path / "done" / "checkpoint_last.pt", weights_only=True)
    torch.save({"state_dict": state["state_dict"]}, tmp_path / "modelonly.pt")  # weights without training state
    capsys.readouterr()
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    rc, err = train(tmp_path, out, *args, "--batch-size", "4", data=data, capsys=capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("diffclip: error:") and words in err[0], err
