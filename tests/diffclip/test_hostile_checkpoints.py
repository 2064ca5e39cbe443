"""Hostile and broken checkpoint files, crafted here (none shipped): each is refused quickly with a CheckpointError
naming the file, without allocating what the file claims and without running anything from it."""

import builtins
import io
import resource
import time
import zipfile

import pytest
import torch
from refdata import TINY_CKPT, need

import diffclip
from diffclip.checkpoint import MAX_LISTED, CheckpointError, read_state_dict


@pytest.fixture(scope="module")
def tiny_sd():
    # The first meta-device model of a process imports torch's meta kernels (about 1.5 s, once): do it here so the
    # timings below measure the refusal itself.
    diffclip.load(need(TINY_CKPT), attn_backend="eager")
    return read_state_dict(need(TINY_CKPT))


def _refused(path, match, seconds=1.0):
    """Load `path`; it must raise a CheckpointError naming the file and matching `match`, within `seconds` and a
    bounded amount of extra memory."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as info:
        diffclip.load(str(path), attn_backend="eager")
    elapsed = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert str(path) in str(info.value)
    assert elapsed < seconds, f"refused after {elapsed:.2f} s"
    assert grown_mb < 64, f"peak memory grew by {grown_mb:.0f} MB before refusing"
    return str(info.value)


def test_stray_block_index_does_not_build_a_deep_model(tmp_path, tiny_sd):
    from diffclip.checkpoint import save_safetensors

    sd = dict(tiny_sd, **{"visual.blocks.3000.x": torch.zeros(1)})
    path = tmp_path / "deep.safetensors"
    save_safetensors(sd, str(path))
    _refused(path, r"block indices under 'visual.blocks.' are not 0..n-1")


def test_stride_zero_tensor_does_not_fake_a_width(tmp_path, tiny_sd):
    sd = dict(tiny_sd, **{"visual.cls_token": torch.zeros(1).expand(1, 1, 2**20)})
    path = tmp_path / "wide.pt"
    torch.save({"state_dict": sd}, str(path))
    _refused(path, r"visual.cls_token.*zero stride")


def test_huge_shape_in_the_file_is_checked_on_the_meta_device(tmp_path, tiny_sd):
    """A real (stored) tensor that claims a huge width: the model built from it lives on the meta device until the
    key/shape check refuses it."""
    sd = dict(tiny_sd, **{"visual.cls_token": torch.zeros(1, 1, 2**16)})
    path = tmp_path / "wide_real.pt"
    torch.save({"state_dict": sd}, str(path))
    _refused(path, "shape mismatches")


def test_allow_list_is_closed_to_process_registrations(tmp_path):
    """Another library registering a global as safe (here `print`) must not make our loader run it."""

    class CallsPrint:
        def __reduce__(self):
            return (builtins.print, ("PWNED-BY-CHECKPOINT",))

    path = tmp_path / "print.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": CallsPrint()}, str(path))
    calls = []
    real_print = builtins.print
    with torch.serialization.safe_globals([builtins.print]):
        builtins.print = lambda *a, **k: calls.append(a)
        try:
            msg = _refused(path, "outside the allow-list")
        finally:
            builtins.print = real_print
    assert "builtins.print" in msg and not calls


def _rewrite_zip(src, dst, compress_type=zipfile.ZIP_STORED, edit=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compress_type) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, edit(info.filename, data) if edit else data, compress_type=compress_type)


def test_compressed_entries_are_refused(tmp_path):
    """A deflated entry can expand far beyond the file (a 0.5 MB file of zeros becomes 512 MiB)."""
    path = tmp_path / "deflated.pt"
    _rewrite_zip(need(TINY_CKPT), path, zipfile.ZIP_DEFLATED)
    _refused(path, "compressed")


def test_corrupt_and_truncated_files(tmp_path):
    data = open(need(TINY_CKPT), "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    _refused(truncated, "not a zip-format|corrupt|truncated")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _refused(garbage, "corrupt or truncated .safetensors")
    bad_pickle = tmp_path / "badpickle.pt"
    _rewrite_zip(need(TINY_CKPT), bad_pickle, edit=lambda n, d: d[:20] if n.endswith("data.pkl") else d)
    _refused(bad_pickle, "unreadable pickle|corrupt")


def test_legacy_format_is_explained(tmp_path, tiny_sd):
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": tiny_sd}, str(path), _use_new_zipfile_serialization=False)
    _refused(path, "legacy torch.save format")


def test_pickle_protocol_4_is_loaded_or_refused_cleanly(tmp_path, tiny_sd):
    path = tmp_path / "proto4.pt"
    torch.save({"state_dict": tiny_sd}, str(path), pickle_protocol=4)
    try:
        model, _, _ = diffclip.load(str(path), attn_backend="eager")
    except CheckpointError as e:
        assert str(path) in str(e) and "protocol" in str(e)
    else:
        assert model.config.vision_width == 128


@pytest.mark.parametrize("key,value,match", [
    ("visual.blocks.0.attn.lambda_q1", torch.zeros(0), "non-empty 1-d"),
    ("visual.cls_token", torch.tensor(0.5), "non-empty 3-d"),
    ("visual.pos_embed", torch.zeros(1, 7, 128), "not a square grid"),
], ids=["empty-lambda", "0d-cls-token", "non-square-grid"])
def test_inconsistent_shapes_are_named(tmp_path, tiny_sd, key, value, match):
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": dict(tiny_sd, **{key: value})}, str(path))
    _refused(path, match)


def test_key_listing_is_capped(tmp_path, tiny_sd):
    sd = dict(tiny_sd, **{f"junk.{i}": torch.zeros(1) for i in range(500)})
    path = tmp_path / "junk.pt"
    torch.save({"state_dict": sd}, str(path))
    msg = _refused(path, r"unexpected keys: .* and 488 more")
    listed = msg.split("unexpected keys: ")[1]
    assert listed.count("junk.") == MAX_LISTED and len(msg) < 2000


def test_bytes_file_object_not_needed_for_official_load(tiny_sd):
    """Sanity: the official tiny checkpoint still loads (fp32 parameters, nothing left on the meta device)."""
    model, _, _ = diffclip.load(need(TINY_CKPT), attn_backend="eager")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
