"""Every numerical tolerance of the test suite, in one place.

Kernels are compared with a float64 evaluation of `kernels.diff_attn_reference` on the same (rounded) inputs.
- fp32: the kernel computes in fp32 throughout (ieee dots), so the bound is fp32 round-off over sums of N terms.
- fp16: P is rounded to fp16 before P·V and the output is rounded to fp16 (unit round-off 4.9e-4): about 3 ulps
  at 1. Measured worst cases sit at 5-30 % of these bounds (fwd) and 3-35 % (bwd), so a real error shows.
- bf16 (GPU only; the interpreter computes bf16 on raw bit patterns, triton-lang/triton#11584): the
  flash-attention idiom, error <= LOWP_FACTOR x PyTorch's own bf16 error against the fp32 reference, plus a floor.
Gradients pass through twice as many rounded products, hence their own, wider, fp16 entry.
"""

import torch

FWD = {
    torch.float32: dict(atol=5e-6, rtol=5e-6),
    torch.float16: dict(atol=1.5e-3, rtol=1.5e-3),  # ~3 fp16 ulps at 1
}
BWD = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}
# dλ and the norm weight's gradient are row sums in the backward preprocess: −rowsum(dO ⊙ O2) over 2d columns of the
# O2 the forward saved in fp16, whose rounding (~3e-4 relative per element) sums to ~5e-3 at d = 128, N = 1 (no
# averaging over keys; measured 6.6e-3). Every backward form shares that preprocess; 4x the BWD fp16 bound.
BWD_ROW_SUMS = {
    torch.float32: BWD[torch.float32],
    torch.float16: dict(atol=2e-2, rtol=2e-2),
}
LOWP_FACTOR = 3.0
LOWP_FLOOR = 1e-3
# DiffCLIP against the official implementation's saved outputs (model issue).
MODEL_EAGER_REL = 1e-5
MODEL_OTHER_REL = 1e-4


def assert_close(actual, expected, dtype, table, what=""):
    """`actual` (any dtype) vs a float64 reference, with the table's per-dtype tolerance."""
    tol = table[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


def assert_close_lowp(actual, expected64, torch_lowp, what=""):
    """Flash-attention idiom: |actual - ref| <= LOWP_FACTOR * |torch_lowp - ref| (max norms) + LOWP_FLOOR."""
    ours = (actual.double() - expected64).abs().max().item()
    theirs = (torch_lowp.double() - expected64).abs().max().item()
    assert ours <= LOWP_FACTOR * theirs + LOWP_FLOOR, f"{what}: error {ours:.3e} vs PyTorch's own {theirs:.3e}"
# `diffclip train` (training issue): one optimizer step computed two ways that are equal in exact arithmetic (2
# processes x batch b vs 1 x 2b; accumulation vs one batch). The summation order differs, and the contrastive
# loss multiplies embedding round-off by the logit scale (~14) before the softmax, so single gradient elements
# differ by up to a few 1e-5 of their tensor's largest element (measured 2.8e-5): bounded relative to that.
TRAIN_GRAD_REL = 1e-4
TRAIN_PARAM_ATOL = 1e-6  # parameters after the step (lr 1e-3: a thousandth of one update)
