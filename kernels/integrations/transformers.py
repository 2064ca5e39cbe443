"""transformers' DiffLlama on the fused differential-attention kernels: `use_diff_attn(model)`.

    from transformers import DiffLlamaForCausalLM
    from kernels.integrations.transformers import use_diff_attn

    model = use_diff_attn(DiffLlamaForCausalLM.from_pretrained(...))   # every DiffLlamaAttention now runs the kernels
    use_diff_attn(model, enable=False)                                 # back to the implementation it had before

What it does. `use_diff_attn` registers the attention implementation ``"diff_attn_triton"`` with transformers
(`AttentionInterface`, and `AttentionMaskInterface` with a mask function that hands the attention modules the 2-D
boolean padding mask, or None when no token is padded: FlashAttention's convention), sets it on the model, and
swaps the class of each `DiffLlamaAttention` for a subclass whose forward runs the whole differential combination,
λ-difference, per-head RMS norm and (1 − λ_init) included, in one kernel call:

- DiffLlama's head pairing: diff-head h (of H = Hq/2) is query heads h (map 1) and h + H (map 2). Map 1 reads key
  head g = h // G, map 2 key head g + Hkv (Hkv = Hkv_hf/2 groups, G = H/Hkv: GQA), and both maps' 2d-wide value is
  cat(value[g], value[g + Hkv]) — the two value-head halves DiffLlama concatenates after its two attention calls.
- λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, computed as DiffLlama does (fp32 sums, exp cast to the query dtype, the
  difference in that dtype) and differentiable in the four parameters; the epilogue is RMSNorm over 2d without
  affine (eps = config.rms_norm_eps): norm_weight = ones(2d), out_scale = 1 − λ_init.
- Three paths, each one small function below (`_dense_call`, `_varlen_call`, `_decode_call`):
  prefill/training without padding and without past keys -> dense (`kernels.diff_attn`, head_layout="halves");
  any 2-D padding mask (left, right or holes) or a prefill onto past keys -> varlen (unpadded, FlashAttention's
  convention, causal bottom-right, output scattered back with zeros at padded query positions);
  1..`DECODE_MAX_QUERIES` new tokens against a KV cache without gradient -> decode (split-K).

Copies (what is not read in place). Element size s bytes, B sequences, Lq new tokens, T_q and T_k valid (unpadded)
query and key tokens, Hq query heads, Hkv_hf key/value heads of d each:
- varlen path: the unpad gather is one copy per tensor, and the head reorder (halves -> the kernel's interleaved
  pairs) happens inside that same gather (one advanced index, no second copy): it reads and writes
  (T_q·Hq + 2·T_k·Hkv_hf)·d·s bytes each; the output scatter writes B·Lq·Hq·d·s (zeros) + T_q·Hq·d·s. In training
  their gradients cost the same again (a scatter-add into zeros of the padded shape per input, one gather).
- dense path (no padding, no past keys): none. `kernels.diff_attn(..., head_layout="halves")` reads q, k, v in place
  through their strides (GQA included) and its output reshapes to (B, N, Hq·d) for o_proj without a copy.
- decode path: none. `kernels.diff_attn_decode(..., head_layout="halves", cache_leftpad=...)` reads the new
  queries and the cache (DynamicCache's own tensors) in place; left padding is the start offset of each row's keys.
  `benchmarks/bench_difflama.py` times the varlen copies alone (prefill) and the decode step.

Host syncs: the varlen path reads the valid-token counts and indices (as FlashAttention's unpad does); the decode
path reads one flag (is every row's mask one contiguous run ending at the new tokens?) to choose between decode and
varlen; the mask function reads whether any token is padded (as transformers' flash_attention_mask does).

Refused (TypeError/ValueError naming the problem, never a silent fallback): models other than DiffLlama;
output_attentions=True (attention weights are never materialised); attention_dropout > 0 in training; head dims
other than 16/32/64/128 or dtypes other than fp16/bf16/fp32; 4-D (custom) attention masks; packed-sequence inputs
(position_ids restarting inside a row, or FlashAttention's cu_seq_lens_* kwargs); caches whose update does not return
exactly past + new keys (StaticCache, sliding windows); bidirectional (is_causal=False) configs.

Tested with transformers 5.24 (its `cache` keyword; the older `past_key_values` keyword is accepted too).
"""

from __future__ import annotations

import torch

try:
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, flash_attention_mask
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.diffllama import modeling_diffllama as _hf_diffllama
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "kernels.integrations.transformers needs Hugging Face transformers with DiffLlama and its attention/mask "
        "interfaces (tested with 5.24): pip install -e \".[lm]\" (the `lm` extra of diffclip-triton); "
        f"import failed with: {exc}"
    ) from exc

import kernels
from kernels.validate import KERNEL_DTYPES, KERNEL_HEAD_DIMS

__all__ = ["use_diff_attn", "ATTN_IMPLEMENTATION", "DECODE_MAX_QUERIES", "is_diff_attn_enabled"]

ATTN_IMPLEMENTATION = "diff_attn_triton"
# New tokens per sequence up to which a call against past keys takes the decode kernel (greedy decoding: 1;
# speculative/assisted decoding: a few). Its programs hold all G·Nq rows of a KV group, so beyond a few rows the
# varlen kernel's query tiling is the better fit.
DECODE_MAX_QUERIES = 16

DiffLlamaAttention = _hf_diffllama.DiffLlamaAttention
DiffLlamaPreTrainedModel = _hf_diffllama.DiffLlamaPreTrainedModel
_apply_rotary_pos_emb = _hf_diffllama.apply_rotary_pos_emb

# Keyword arguments FlashAttention-style padding-free (packed) batches arrive with; not supported.
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# --------------------------------------------------------------------------------------------------------------------
# transformers registration
# --------------------------------------------------------------------------------------------------------------------

def _attention_function(module, query, key, value, attention_mask, **kwargs):
    """Registered under ATTN_IMPLEMENTATION so that transformers accepts the name. The switched DiffLlama modules never
    call it (they run the whole differential combination in one kernel call); anything else that does is an error."""
    raise TypeError(
        f"attn_implementation={ATTN_IMPLEMENTATION!r} is only usable through "
        f"kernels.integrations.transformers.use_diff_attn on a DiffLlama model; {type(module).__name__} called the "
        "generic attention interface with it (was the model's config shared with a model that was not switched, or "
        "was the implementation set by name instead of by use_diff_attn?)"
    )


def _mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                   attention_mask=None, **kwargs):
    """The mask the switched modules receive: transformers' FlashAttention convention (the 2-D boolean padding mask
    over the keys, sliced to kv_length, or None when nothing is padded), after refusing any pattern other than plain
    causal (packed sequences, bidirectional configs, extra mask functions), which a padding mask cannot express."""
    if mask_function is not causal_mask_function:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise ValueError(
            f"use_diff_attn supports causal attention with a 2-D padding mask only; transformers asked for another "
            f"mask pattern ({name}): packed sequences (position_ids restarting within a row), is_causal=False or "
            "custom mask functions are not supported"
        )
    return flash_attention_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                                mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def _register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_function)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask_function)


# --------------------------------------------------------------------------------------------------------------------
# the kernel call sites: one small function per path (q in DiffLlama's halves layout, k/v its Hkv_hf heads)
# --------------------------------------------------------------------------------------------------------------------

def _dense_call(q, k, v, lam, *, scale, norm_weight, norm_eps, out_scale):
    """Causal attention without padding, Lq == Lk. q (B, Hq, N, d), k and v (B, Hkv_hf, N, d) as DiffLlama's
    projections give them (strided views, read in place: no copy) -> (B, H, N, 2d), a transposed view of a
    (B, N, H, 2d) buffer."""
    return kernels.diff_attn(q, k, v, lam, causal=True, scale=scale, norm_weight=norm_weight, norm_eps=norm_eps,
                             out_scale=out_scale, head_layout="halves")


def _varlen_call(q, k, v, lam, cu_q, cu_k, max_q, max_k, *, scale, norm_weight, norm_eps, out_scale):
    """The kernel's own varlen layout: q (T_q, 2H, d), k (T_k, 2Hkv, d), v (T_k, Hkv, 2d) -> (T_q, H, 2d)."""
    return kernels.diff_attn_varlen(q, k, v, lam, cu_q, cu_k, max_q, max_k, causal=True, scale=scale,
                                    norm_weight=norm_weight, norm_eps=norm_eps, out_scale=out_scale)


def _decode_call(q, k, v, lam, *, cache_seqlens, cache_leftpad, scale, norm_weight, norm_eps, out_scale):
    """Lq new tokens against past keys, no gradient. q (B, Hq, Lq, d); k, v (B, Hkv_hf, Lk, d) (the cache, new keys
    included), read in place; sequence b's valid keys are [cache_leftpad[b], cache_seqlens[b]) (int32 (B,)), its
    queries the last Lq positions -> (B, H, Lq, 2d)."""
    return kernels.diff_attn_decode(q, k, v, lam, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
                                    head_layout="halves", scale=scale, norm_weight=norm_weight, norm_eps=norm_eps,
                                    out_scale=out_scale)


# --------------------------------------------------------------------------------------------------------------------
# unpad / pad
# --------------------------------------------------------------------------------------------------------------------

def _gather_pairs(x, b_idx, n_idx, *, value=False):
    """One gather that unpads and reorders heads: x (B, 2m, L, d) in DiffLlama's halves layout (head j of map 1 is
    x[:, j], of map 2 x[:, j + m]) -> (T, 2m, d) with the pairs interleaved (2j, 2j+1), or for values (T, m, 2d)
    with cat(x[:, j], x[:, j + m]) as head j. Token t is x[b_idx[t], :, n_idx[t]]. Any strides; the three index
    tensors broadcast to (T, m, 2), so the result is allocated contiguous in that order and the views are free."""
    m = x.shape[1] // 2
    heads = (torch.arange(2, device=x.device)[None, :] * m + torch.arange(m, device=x.device)[:, None])  # (m, 2)
    out = x[b_idx[:, None, None], heads[None], n_idx[:, None, None]]  # (T, m, 2, d)
    return out.view(out.shape[0], m, 2 * x.shape[-1]) if value else out.view(out.shape[0], 2 * m, x.shape[-1])


def _unpadded(q, k, v, lam, key_valid, *, scale, norm_weight, norm_eps, out_scale):
    """The varlen path. key_valid (B, Lk) bool marks valid keys; the queries are the last Lq positions and valid where
    key_valid is (any pattern: in compacted coordinates bottom-right causal is exactly 'valid keys at positions <=
    the query's'). -> (B, H, Lq, 2d), zeros at invalid query positions."""
    B, Hq, Lq, d = q.shape
    q_valid = key_valid[:, -Lq:]
    bq, nq = q_valid.nonzero(as_tuple=True)  # row-major: grouped by sequence, as the cu_seqlens packing
    bk, nk = key_valid.nonzero(as_tuple=True)
    lens = torch.stack([q_valid.sum(1), key_valid.sum(1)]).to(torch.int32)  # (2, B)
    cu = torch.nn.functional.pad(lens.cumsum(1, dtype=torch.int32), (1, 0))
    max_q, max_k = (int(x) for x in lens.max(dim=1).values.tolist()) if B else (0, 0)
    out = _varlen_call(_gather_pairs(q, bq, nq), _gather_pairs(k, bk, nk), _gather_pairs(v, bk, nk, value=True),
                       lam, cu[0].contiguous(), cu[1].contiguous(), max_q, max_k, scale=scale,
                       norm_weight=norm_weight, norm_eps=norm_eps, out_scale=out_scale)  # (T_q, H, 2d)
    padded = out.new_zeros(B, Lq, out.shape[1], out.shape[2])
    padded[bq, nq] = out  # in place into the fresh zeros (index_put would copy them first); differentiable in out
    return padded.transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# the attention module
# --------------------------------------------------------------------------------------------------------------------

_ONES: dict = {}


def _unit_norm_weight(width: int, device: torch.device) -> torch.Tensor:
    """ones(2d) in fp32 without grad, one per (width, device): DiffLlama's groupnorm has no affine weight."""
    key = (width, str(device))
    w = _ONES.get(key)
    if w is None:
        # Made outside inference mode even when the first call runs in it: an inference tensor cached here could
        # never again be saved for a backward (a later training step would fail).
        with torch.inference_mode(False):
            w = _ONES[key] = torch.ones(width, dtype=torch.float32, device=device)
    return w


def _lambda_full(module, dtype):
    """DiffLlama's λ, with its rounding: fp32 sums, exp cast to the query dtype, the difference in that dtype."""
    lambda_1 = torch.exp(torch.sum(module.lambda_q1 * module.lambda_k1, dim=-1, dtype=torch.float32)).to(dtype)
    lambda_2 = torch.exp(torch.sum(module.lambda_q2 * module.lambda_k2, dim=-1, dtype=torch.float32)).to(dtype)
    return lambda_1 - lambda_2 + module.lambda_init


def _norm_eps(module, dtype) -> float:
    eps = module.groupnorm.eps
    return float(torch.finfo(dtype).eps if eps is None else eps)


def _refuse_unsupported(module, hidden_states, attention_mask, kwargs) -> None:
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        raise ValueError("use_diff_attn: output_attentions=True is not supported: the fused kernel never materialises "
                         "the attention weights (switch back with use_diff_attn(model, enable=False) to get them)")
    if module.training and module.attention_dropout > 0:
        raise ValueError(f"use_diff_attn: attention_dropout={module.attention_dropout} > 0 in training is not "
                         "supported (the kernel has no dropout); set it to 0 or call model.eval()")
    if any(kwargs.get(name) is not None for name in _PACKED_KWARGS):
        raise ValueError("use_diff_attn: packed (padding-free) batches with cu_seq_lens_q/cu_seq_lens_k are not "
                         "supported; pass a padded batch with its 2-D attention_mask")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(f"use_diff_attn: the attention modules got a mask of shape {shape}; only 2-D padding masks "
                         "(batch, keys) are supported, not 4-D or block masks (custom masks cannot be expressed as "
                         "the kernels' causal + padding)")
    dtype = module.q_proj.weight.dtype if not torch.is_autocast_enabled(hidden_states.device.type) else \
        torch.get_autocast_dtype(hidden_states.device.type)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"use_diff_attn: the kernels run float16, bfloat16 or float32; the attention computes in "
                        f"{dtype}")


def _check_mask_shape(attention_mask, batch: int, keys: int) -> None:
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, keys):
        raise ValueError(f"use_diff_attn: the 2-D attention mask has shape {tuple(attention_mask.shape)} but the "
                         f"keys are (batch, past + new) = ({batch}, {keys})")


class DiffAttnDiffLlamaAttention(DiffLlamaAttention):
    """DiffLlamaAttention whose forward runs the differential combination in the fused kernels. Instances are made by
    `use_diff_attn` (which swaps the class of existing modules); same parameters, same state dict."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        _refuse_unsupported(self, hidden_states, attention_mask, kwargs)
        B, Lq = hidden_states.shape[:-1]
        hidden_shape = (B, Lq, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hq, Lq, d)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv_hf, Lq, d)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = _apply_rotary_pos_emb(q, k, cos, sin)
        lam_dtype = q.dtype  # DiffLlama rounds λ to its query dtype (fp32 after RoPE under autocast)
        if torch.is_autocast_enabled(q.device.type):
            # RoPE in fp32 leaves q/k in fp32 beside a bf16 v. Cast the NEW tokens only, before they enter the cache:
            # casting after the update would copy the whole cache at every decoding step.
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            if isinstance(past, torch.Tensor):
                raise ValueError(f"use_diff_attn: {type(cache).__name__} (a static cache) is not supported; use the "
                                 "default DynamicCache")
            _check_mask_shape(attention_mask, B, past + Lq)  # before the update: a refused call leaves no keys
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
            if k.shape[-2] != past + Lq:
                raise ValueError(f"use_diff_attn: {type(cache).__name__} returned {k.shape[-2]} keys for {past} past + "
                                 f"{Lq} new tokens; only caches that keep every key (DynamicCache) are supported "
                                 "(no sliding window or static cache)")
            if k.dtype != q.dtype:  # a cache filled before the switch (or outside autocast): the rare copy
                k, v = k.to(q.dtype), v.to(q.dtype)

        out = self._attend(q, k, v, attention_mask, lam_dtype)  # (B, H, Lq, 2d)
        out = out.transpose(1, 2).reshape(B, Lq, -1)
        return self.o_proj(out), None

    def _attend(self, q, k, v, attention_mask, lam_dtype):
        B, _, Lq, d = q.shape
        Lk = k.shape[-2]
        lam = _lambda_full(self, lam_dtype)
        epi = dict(scale=self.scaling, norm_weight=_unit_norm_weight(2 * d, q.device),
                   norm_eps=_norm_eps(self, q.dtype), out_scale=1.0 - self.lambda_init)
        _check_mask_shape(attention_mask, B, Lk)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, lam))
        if Lq < Lk and Lq <= DECODE_MAX_QUERIES and not grad:
            if attention_mask is None:
                leftpad = torch.zeros(B, dtype=torch.int32, device=q.device)
                return _decode_call(q, k, v, lam, cache_seqlens=torch.full_like(leftpad, Lk), cache_leftpad=leftpad,
                                    **epi)
            mask = attention_mask.to(torch.bool)
            leftpad = mask.to(torch.int8).argmax(dim=1)  # first valid key (0 for an all-padded row)
            if bool(((mask.sum(dim=1) + leftpad) == Lk).all()):  # each row: one run of valid keys up to the end
                return _decode_call(q, k, v, lam, cache_seqlens=torch.full((B,), Lk, dtype=torch.int32,
                                                                           device=q.device),
                                    cache_leftpad=leftpad.to(torch.int32), **epi)
            return _unpadded(q, k, v, lam, mask, **epi)
        if attention_mask is None:
            if Lq == Lk:
                return _dense_call(q, k, v, lam, **epi)
            return _unpadded(q, k, v, lam, torch.ones(B, Lk, dtype=torch.bool, device=q.device), **epi)
        return _unpadded(q, k, v, lam, attention_mask.to(torch.bool), **epi)


# --------------------------------------------------------------------------------------------------------------------
# the switch
# --------------------------------------------------------------------------------------------------------------------

def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, DiffLlamaAttention)]


def is_diff_attn_enabled(model) -> bool:
    """Whether `use_diff_attn` switched this model (all its DiffLlama attention modules run the kernels)."""
    mods = _attention_modules(model)
    return bool(mods) and all(type(m) is DiffAttnDiffLlamaAttention for m in mods)


def use_diff_attn(model, enable: bool = True):
    """Switch a transformers DiffLlama model's attention to the fused differential-attention kernels (in place).

    Args:
        model: a `DiffLlamaPreTrainedModel` (DiffLlamaForCausalLM, DiffLlamaModel, the classification/QA heads).
        enable: False switches back: the modules get their own class again and the model the attention
            implementation it had before (eager, sdpa, ...). Switching twice either way is harmless.

    Returns:
        the model (switched in place).

    Raises:
        TypeError: not a DiffLlama model; a dtype the kernels do not run.
        ValueError: a head dim the kernels do not run (16, 32, 64, 128); odd head counts. At run time (from the
            forward): output_attentions=True, attention_dropout > 0 in training, 4-D masks, packed sequences,
            static/sliding caches.
    """
    if not isinstance(model, DiffLlamaPreTrainedModel):
        raise TypeError(f"use_diff_attn supports transformers' DiffLlama models (DiffLlamaPreTrainedModel), got "
                        f"{type(model).__name__}")
    modules = _attention_modules(model)
    if not enable:
        for m in modules:
            if type(m) is DiffAttnDiffLlamaAttention:
                m.__class__ = DiffLlamaAttention
        # Remembered on the model that was switched and on its attention modules (shared by an outer model and
        # its inner DiffLlamaModel, so either may switch back).
        previous = getattr(model, "_diff_attn_previous_impl", None) or next(
            (m._diff_attn_previous_impl for m in modules if hasattr(m, "_diff_attn_previous_impl")), None)
        if model.config._attn_implementation == ATTN_IMPLEMENTATION:
            model.set_attn_implementation(previous or "eager")
        for owner in [model, *modules]:
            if hasattr(owner, "_diff_attn_previous_impl"):
                del owner._diff_attn_previous_impl
        return model

    if not modules:
        raise TypeError(f"use_diff_attn: {type(model).__name__} has no DiffLlamaAttention module")
    for m in modules:
        if m.head_dim not in KERNEL_HEAD_DIMS:
            raise ValueError(f"use_diff_attn: head_dim {m.head_dim} is not supported; the kernels run head dims "
                             f"{KERNEL_HEAD_DIMS}")
        hq, hkv = m.config.num_attention_heads, m.config.num_key_value_heads
        if hq % 2 or hkv % 2 or (hq // 2) % (hkv // 2):
            raise ValueError(f"use_diff_attn: {hq} query heads and {hkv} key/value heads do not form DiffLlama's "
                             "pairs (both even, query pairs a multiple of key/value pairs)")
        dtype = m.q_proj.weight.dtype
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"use_diff_attn: parameters in {dtype}; the kernels run float16, bfloat16 or float32")
    _register()
    current = model.config._attn_implementation
    if current != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise TypeError(f"use_diff_attn: transformers did not accept attn_implementation={ATTN_IMPLEMENTATION!r} "
                            f"for {type(model).__name__} (it kept {model.config._attn_implementation!r})")
        model._diff_attn_previous_impl = current
        for m in modules:
            m._diff_attn_previous_impl = current
    for m in modules:
        m.__class__ = DiffAttnDiffLlamaAttention
    return model
