"""Paths of the shared reference data (made by the official DiffCLIP code); tests skip when it is absent."""

import os

import pytest
from conftest import SHARED_REFERENCE

TINY_CKPT = os.path.join(SHARED_REFERENCE, "diffclip_tiny_checkpoint.pt")
TINY_IO = os.path.join(SHARED_REFERENCE, "diffclip_tiny_io.pt")
VITB16_KEYS = os.path.join(SHARED_REFERENCE, "diffclip_vitb16_keys.json")


def need(path):
    if not os.path.exists(path):
        pytest.skip(f"reference data {os.path.basename(path)} not found in {SHARED_REFERENCE} (a plain clone has "
                    "no ../shared)")
    return path
