"""Hugging Face's separate `kernels` package has the same import name as ours. With ours importable, transformers
must still import, must not mistake ours for theirs (its `is_kernels_available()` reads the version of whatever
distribution provides `kernels`: ours is 0.1.0, below the 0.18.2 it requires, so it stays off), and a tiny DiffLlama
built from a local config (no download) must run. In a fresh interpreter, so that import order is the real one."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CODE = r"""
import torch, transformers
from transformers.utils.import_utils import is_kernels_available
import kernels
assert os.path.realpath(kernels.__file__).startswith(os.path.realpath(ROOT)), kernels.__file__
assert hasattr(kernels, "diff_attn_varlen")
assert not is_kernels_available(), "transformers took this project's `kernels` for Hugging Face's"
from transformers import DiffLlamaConfig, DiffLlamaForCausalLM
cfg = DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
model = DiffLlamaForCausalLM(cfg).eval()
logits = model(torch.randint(0, 64, (2, 7))).logits
assert logits.shape == (2, 7, 64) and torch.isfinite(logits).all()
out = model.generate(torch.randint(0, 64, (1, 3)), max_new_tokens=4, do_sample=False)
assert out.shape == (1, 7)
print("ok")
"""


def test_transformers_imports_and_runs_beside_our_kernels_package():
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", f"import os\nROOT = {ROOT!r}\n" + CODE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
