"""pytest-benchmark suite setup: on a machine without CUDA, Triton runs through its interpreter (set before
Triton is imported) and the suite uses tiny shapes."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
