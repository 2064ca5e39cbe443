"""Outputs of `diffclip embed` / `eval` / `convert`: checked before the model loads (a non-UTF-8 file name, a
--json into a missing folder or at a folder), created with the umask's permissions (not mkstemp's 0600), one run
per output folder at a time (an advisory lock), nothing half-written left behind."""

import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from refdata import TINY_CKPT, need

from diffclip.cli import main


def _png(path, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")).save(path)


@pytest.fixture
def tree(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for j in range(2):
            _png(tmp_path / "data" / c / f"{j}.png", 3 * len(c) + j)
    return tmp_path


def _last_error(capsys):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err and err[-1].startswith("diffclip: error:"), err
    return err[-1]


def test_non_utf8_file_name_is_refused_before_the_model_loads(tree, capsys):
    bad = os.path.join(os.fsencode(str(tree / "data" / "cat")), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    _png(bad.decode("utf-8", "surrogateescape"))
    # A checkpoint that does not exist: an error about it would mean the names were not checked first.
    assert main(["embed", str(tree / "data" / "cat"), "--out", str(tree / "out"),
                 "--checkpoint", str(tree / "no.pt")]) == 2
    err = _last_error(capsys)
    assert "not valid UTF-8" in err and "no.pt" not in err, err
    assert not (tree / "out").exists() or os.listdir(tree / "out") == []


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_bad_json_path_is_refused_before_the_model_loads(tree, capsys, where):
    target = tree / "nowhere" / "r.json" if where == "missing-folder" else tree / "data"
    assert main(["eval", "zeroshot", "--data", str(tree / "data"), "--json", str(target),
                 "--checkpoint", str(tree / "no.pt")]) == 2
    err = _last_error(capsys)
    assert ("folder does not exist" if where == "missing-folder" else "is a folder") in err and "no.pt" not in err
    assert not [n for n in os.listdir(tree) if n.endswith(".part")]


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_respect_the_umask(tree):
    ck = need(TINY_CKPT)
    old = os.umask(0o022)
    try:
        assert main(["eval", "zeroshot", "--data", str(tree / "data"), "--json", str(tree / "r.json"),
                     "--checkpoint", ck, "--backend", "eager", "--num-workers", "0"]) == 0
        assert main(["embed", str(tree / "data" / "cat"), "--out", str(tree / "emb"), "--checkpoint", ck,
                     "--backend", "eager", "--num-workers", "0"]) == 0
        assert main(["convert", ck, str(tree / "w.safetensors")]) == 0
    finally:
        os.umask(old)
    outputs = [tree / "r.json", tree / "w.safetensors"] + [tree / "emb" / n for n in os.listdir(tree / "emb")]
    assert sorted(os.listdir(tree / "emb")) == ["image_embeddings.npy", "paths.txt"]  # no lock file left behind
    for p in outputs:
        assert _mode(p) == 0o644, (p, oct(_mode(p)))


def test_a_folder_in_use_by_another_run_is_refused(tree, capsys):
    """A second process holds the output folder's lock (as a running `embed` does): this run is refused at once,
    before the model loads, and the other run's files are untouched."""
    out = tree / "emb"
    out.mkdir()
    (out / "paths.txt").write_text("theirs\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from diffclip.outputs import FolderLock; "
        "FolderLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)"),
        os.getcwd(), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["embed", str(tree / "data" / "cat"), "--out", str(out),
                     "--checkpoint", str(tree / "no.pt")]) == 2
        err = _last_error(capsys)
        assert "being written by another run" in err and "no.pt" not in err, err
        assert (out / "paths.txt").read_text() == "theirs\n"
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert main(["embed", str(tree / "data" / "cat"), "--out", str(out), "--checkpoint", need(TINY_CKPT),
                 "--backend", "eager", "--num-workers", "0"]) == 0  # a lock left by a killed run is no obstacle
