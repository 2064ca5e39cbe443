"""Checkpoints are untrusted: the allow-list admits the official format and refuses anything else, unrun."""

import os

import pytest
import torch
from refdata import TINY_CKPT, need

import diffclip
from diffclip.checkpoint import CheckpointError, read_state_dict


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_official_training_checkpoint_needs_the_allow_list():
    """The file really is refused by plain weights_only=True (so the allow-list is doing the work)."""
    with pytest.raises(Exception, match="numpy"):
        torch.load(need(TINY_CKPT), weights_only=True)
    assert len(read_state_dict(TINY_CKPT)) == 97


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match="system"):
        diffclip.load(path)
    assert not marker.exists()


def test_missing_key_is_named(tmp_path):
    sd = read_state_dict(need(TINY_CKPT))
    del sd["visual.blocks.1.attn.lambda_k2"]
    sd["visual.extra.weight"] = torch.zeros(3)
    path = str(tmp_path / "broken.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    with pytest.raises(CheckpointError) as info:
        diffclip.load(path)
    assert "missing keys: visual.blocks.1.attn.lambda_k2" in str(info.value)
    assert "unexpected keys: visual.extra.weight" in str(info.value)


def test_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "list.pt")
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="no state dict"):
        diffclip.load(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        diffclip.load(str(bad))
    with pytest.raises(FileNotFoundError):
        diffclip.load(str(tmp_path / "nope.pt"))


def test_safetensors_round_trip(tmp_path):
    from diffclip.checkpoint import save_safetensors

    sd = read_state_dict(need(TINY_CKPT))
    path = str(tmp_path / "tiny.safetensors")
    save_safetensors(sd, path)
    back = read_state_dict(path)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    model, _, _ = diffclip.load(path, attn_backend="eager")
    assert model.config.vision_width == 128


def test_offline_hub_error_names_cache_and_local_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        diffclip.hub.resolve_source("hammh0a/DiffCLIP_ViTB16_CC3M")
    msg = str(info.value)
    assert "cache" in msg and "local file" in msg and "hammh0a/DiffCLIP_ViTB16_CC3M" in msg


def test_hub_id_detection(tmp_path):
    from diffclip.hub import is_hub_id

    assert is_hub_id("hammh0a/DiffCLIP_ViTB16_CC12M") and is_hub_id("hf-hub:a/b")
    assert not is_hub_id("./a/b") and not is_hub_id("/abs/ckpt.pt") and not is_hub_id("ckpt.pt")
