"""Argument checking shared by `diff_attn` and `diff_attn_reference`.

Every bad input gets a `TypeError`/`ValueError` that names the argument and what was expected, before anything is
launched: a wrong shape must never surface as an out-of-bounds read inside a Triton kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from .layouts import value_strides

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
# The forward and the backward's preprocess address a tile as a 64-bit scalar base (batch, head, first row) plus
# 32-bit in-tile offsets (row·stride_n + col·stride_d, rows < 128, cols < 256; the dK/dV and dQ loops use 64-bit
# row offsets throughout). Strides along N and d up to 2^22 elements keep those offsets
# below 2^31 (382·2^22 < 2^31); sequences of any length are fine. Larger strides are refused, not wrapped.
MAX_TILE_STRIDE = 2**22
# The value's "split offset" (the distance between the two d-wide halves of a 2d-wide value, see HEAD_LAYOUTS) is
# part of the same 32-bit in-tile offset: (row·stride_n + (c mod d)·stride_d + (c div d)·split), rows < 128,
# c mod d < 128. With the strides above at most 2^22, a split of at most 2^30 keeps the sum below 2^31
# (2·127·2^22 + 2^30 < 2^31). Only the "halves" layout's split (Hkv·v.stride(1)) can be that large; interleaved's is
# d·stride_d, already covered. The query/key pair offsets are scalars added to 64-bit bases: no bound needed.
MAX_SPLIT_OFFSET = 2**30

# Where a diff-head's two query heads, its group's two key heads and its 2d-wide value live (kernels.diff_attn's
# docstring has the shapes): "interleaved" (DiffCLIP / Diff-Transformer V1: heads 2h, 2h+1; value head g is 2d wide),
# "halves" (transformers' DiffLlama: heads h and h+H; value = cat(v[g], v[g+Hkv])), "v2" (Diff Transformer V2: both
# maps read one key head and one d-wide value head).
HEAD_LAYOUTS = ("interleaved", "halves", "v2")


def tile_strides_ok(x: torch.Tensor) -> bool:
    """Whether a (B, heads, N, width) tensor's strides along N and the feature dim fit the kernels' 32-bit
    in-tile offsets (see MAX_TILE_STRIDE)."""
    return x.stride(2) <= MAX_TILE_STRIDE and x.stride(3) <= MAX_TILE_STRIDE


@dataclass(frozen=True)
class DiffAttnArgs:
    """Normalised arguments: sizes, the scale as a float, and λ as a 3-d tensor broadcastable to (B, H, N)."""

    batch: int
    heads: int  # diff-heads H; q carries 2H heads
    seqlen: int
    head_dim: int
    scale: float
    # 3-d, fp32 (fp64 for fp64 inputs), a reshaped view of the caller's λ ((1, 1, 1) for a number or a 0-d λ,
    # (1, H, 1) per head, ...): autograd reduces its gradient back to λ's own shape through the reshape.
    lam: torch.Tensor
    kv_heads: int = 0  # key/value groups Hkv (H % Hkv == 0); diff-head h reads group h // (H / Hkv)
    head_layout: str = "interleaved"

    @property
    def value_width(self) -> int:
        """Width of one diff-head's value and output rows: 2d, or d for the v2 layout."""
        return self.head_dim if self.head_layout == "v2" else 2 * self.head_dim


def _require_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _finite_float(name: str, x, *, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) a float argument is symbolic, and a
    # comparison becomes a guard where math.isfinite would break the graph. NaN fails both comparisons.
    if not -math.inf < x < math.inf:
        raise ValueError(f"{name} must be finite, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    return x


def check_norm_weight(norm_weight, d: int, device: torch.device, q_name: str = "q", *, v2: bool = False,
                      for_kernel: bool = False) -> None:
    """The RMS-norm epilogue's weight, when given: a floating tensor of the output rows' width, (2d,) or (d,) for
    the v2 layout, on the inputs' device; for a kernel, with a stride up to MAX_TILE_STRIDE (the kernels address it
    with 32-bit offsets col·stride; a larger stride is refused, not wrapped)."""
    if norm_weight is None:
        return
    _require_tensor("norm_weight", norm_weight)
    width, name = (d, "(d,)") if v2 else (2 * d, "(2d,)")
    if norm_weight.shape != (width,):
        raise ValueError(f"norm_weight must have shape {name}=({width},), got {tuple(norm_weight.shape)}")
    if not norm_weight.is_floating_point():
        raise TypeError(f"norm_weight must be floating point, got {norm_weight.dtype}")
    if norm_weight.device != device:
        raise ValueError(f"norm_weight is on {norm_weight.device} but {q_name} is on {device}")
    if for_kernel and abs(norm_weight.stride(0)) > MAX_TILE_STRIDE:
        raise ValueError(f"norm_weight's stride {norm_weight.stride(0)} exceeds {MAX_TILE_STRIDE} elements (the "
                         "kernels' 32-bit offsets); pass norm_weight.contiguous()")


def check_cpu_lam_finite(lam: torch.Tensor) -> None:
    """A non-finite λ on the CPU is an error. On an accelerator this check would cost a host sync per call; there a
    non-finite λ shows as non-finite outputs instead (documented in diff_attn's docstring). (Its own function so
    that benchmarks/host_overhead.py, which runs the GPU path on CPU tensors, can leave it out as a GPU would.)"""
    if not torch.isfinite(lam).all():
        raise ValueError("lam must be finite, got non-finite values")


def _lam_to_3d(lam, B: int, H: int, N: int, dtype: torch.dtype, device: torch.device):
    """λ as a 3-d tensor of `dtype` on `device` that broadcasts to (B, H, N).

    Accepted: a Python number; a 0-d tensor (one λ per layer, DiffCLIP); an (H,) tensor (per head); a (B, H, N)
    tensor (per query token, Diff-Transformer V2); and, generally, any 2-d/3-d tensor that broadcasts to (B, H, N).
    A 1-d tensor always means per head, even when H == N.
    """
    def bad_shape(shape):  # formatted only on error: formatting symbolic sizes would specialise them under compile
        return ValueError(f"lam must be a number, a 0-d tensor, an (H,)=({H},) tensor or a tensor broadcastable to "
                          f"(B, H, N)=({B}, {H}, {N}); got shape {tuple(shape)}")

    if isinstance(lam, torch.Tensor):
        if not (lam.is_floating_point()):
            raise TypeError(f"lam must be a floating-point tensor, got dtype {lam.dtype}")
        shape = lam.shape
        if lam.device != device:
            # A 0-d CPU λ next to CUDA inputs is common (torch.tensor(0.8)); moving one scalar is not a fallback.
            if lam.dim() == 0 and lam.device.type == "cpu":
                lam = lam.to(device)
            else:
                raise ValueError(f"lam is on {lam.device} but q is on {device}")
        if lam.device.type == "cpu" and not torch.compiler.is_compiling():
            check_cpu_lam_finite(lam)
        if lam.dim() == 0:
            view = lam.reshape(1, 1, 1)
        elif lam.dim() == 1:
            if lam.shape[0] not in (1, H):
                raise bad_shape(shape)
            view = lam.reshape(1, -1, 1)
        elif lam.dim() in (2, 3):
            view = lam.reshape((1,) * (3 - lam.dim()) + tuple(lam.shape))
            for got, want in zip(view.shape, (B, H, N)):
                if got not in (1, want):
                    raise bad_shape(shape)
        else:
            raise bad_shape(shape)
        return view.to(dtype)
    value = _finite_float("lam", lam)
    return torch.full((1, 1, 1), value, dtype=dtype, device=device)


def check_head_layout(head_layout) -> str:
    if not isinstance(head_layout, str):
        raise TypeError(f"head_layout must be a str, one of {HEAD_LAYOUTS}; got {type(head_layout).__name__}")
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {head_layout!r}")
    return head_layout


def _check_layout_shapes(q, k, v, head_layout: str) -> int:
    """The shapes of q, k, v for `head_layout` (see HEAD_LAYOUTS); returns the number of key/value groups Hkv."""
    B, H2, N, d = q.shape
    if H2 % 2 != 0:
        pairs = "h, h+H" if head_layout == "halves" else "2h, 2h+1"
        raise ValueError(f"q must have an even number of heads 2H (pairs {pairs}), got {H2}")
    H = H2 // 2
    k_heads = "Hkv" if head_layout == "v2" else "2Hkv"
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must have shape (B, {k_heads}, N, d) with q's B={B}, N={N}, d={d} "
                         f"(head_layout={head_layout!r}), got {tuple(k.shape)}")
    if head_layout == "v2":
        hkv = k.shape[1]
    else:
        if k.shape[1] % 2 != 0:
            raise ValueError(f"k must have an even number of heads 2Hkv (head_layout={head_layout!r}), got "
                             f"{k.shape[1]}")
        hkv = k.shape[1] // 2
    if hkv == 0 or H % hkv != 0:
        raise ValueError(f"GQA: q's H={H} diff-heads must be a multiple of k's Hkv={hkv} key/value groups "
                         f"(k has shape {tuple(k.shape)}, head_layout={head_layout!r})")
    want, form = {
        "interleaved": ((B, hkv, N, 2 * d), "(B, Hkv, N, 2d)"),
        "halves": ((B, 2 * hkv, N, d), "(B, 2Hkv, N, d) (k's shape)"),
        "v2": ((B, hkv, N, d), "(B, Hkv, N, d) (k's shape)"),
    }[head_layout]
    if tuple(v.shape) != want:
        raise ValueError(f"v must have shape {form}={want} for head_layout={head_layout!r}, q of shape "
                         f"{tuple(q.shape)} and k of shape {tuple(k.shape)}; got {tuple(v.shape)}")
    return hkv


def check_diff_attn_args(q, k, v, lam, *, causal, scale, norm_weight, norm_eps, out_scale, for_kernel: bool,
                         head_layout="interleaved"):
    """Validate `diff_attn`'s arguments; return a `DiffAttnArgs`.

    `for_kernel` adds the Triton kernel's own limits (dtype, head dim, strides); the reference runs any float dtype
    and d.
    """
    q = _require_tensor("q", q)
    k = _require_tensor("k", k)
    v = _require_tensor("v", v)
    head_layout = check_head_layout(head_layout)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            want = {"q": "(B, 2H, N, d)", "k": "(B, Hkv, N, d)" if head_layout == "v2" else "(B, 2Hkv, N, d)",
                    "v": {"interleaved": "(B, Hkv, N, 2d)", "halves": "(B, 2Hkv, N, d)",
                          "v2": "(B, Hkv, N, d)"}[head_layout]}[name]
            raise ValueError(f"{name} must be 4-d {want}, got shape {tuple(x.shape)}")
    B, H2, N, d = q.shape
    hkv = _check_layout_shapes(q, k, v, head_layout)
    H = H2 // 2
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if for_kernel:
        if q.dtype not in KERNEL_DTYPES:
            raise TypeError(f"q, k, v dtype must be one of float16, bfloat16, float32 for the kernel, got {q.dtype}")
        if d not in KERNEL_HEAD_DIMS:
            raise ValueError(f"head dim d (q.shape[-1]) must be one of {KERNEL_HEAD_DIMS} for the kernel, got {d}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not tile_strides_ok(x):
                raise ValueError(
                    f"{name} has strides {tuple(x.stride())}: the kernel needs strides along N and d of at most "
                    f"2^22 = {MAX_TILE_STRIDE} elements (its in-tile offsets are 32-bit); pass {name}.contiguous()"
                )
        split = value_strides(v, head_layout, hkv)[2]
        if split > MAX_SPLIT_OFFSET:
            raise ValueError(
                f"v has strides {tuple(v.stride())}: with head_layout='halves' the two halves of a value "
                f"(heads g and g+Hkv) lie Hkv·v.stride(1) = {split} elements apart, "
                f"more than the kernel's 32-bit in-tile offsets allow (2^30); pass a token-major v, e.g. "
                f"v.transpose(1, 2).contiguous().transpose(1, 2)"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = d**-0.5 if scale is None else _finite_float("scale", scale, positive=True)
    _finite_float("norm_eps", norm_eps, positive=True)
    _finite_float("out_scale", out_scale)
    check_norm_weight(norm_weight, d, q.device, v2=head_layout == "v2", for_kernel=for_kernel)
    # λ stays in fp32 (fp64 only when the inputs are fp64, for the float64 reference evaluation).
    lam_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return DiffAttnArgs(B, H, N, d, scale, _lam_to_3d(lam, B, H, N, lam_dtype, q.device), hkv, head_layout)
