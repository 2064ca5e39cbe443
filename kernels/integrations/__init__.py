"""Integrations of the fused differential-attention kernels into other libraries' models.

- `kernels.integrations.transformers`: `use_diff_attn(model)` switches a Hugging Face transformers DiffLlama model's
  attention to the kernels (needs transformers: ``pip install -e ".[lm]"``).

Importing this package imports nothing else; each integration imports its library when it is itself imported.
"""
