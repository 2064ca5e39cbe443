"""A tiny random-weight DiffCLIP configuration shared by the model tests (head dim 16: a kernel head dim)."""

from diffclip import DiffCLIPConfig

TINY = DiffCLIPConfig(embed_dim=16, vision_width=32, vision_img_size=32, vision_patch_size=16, vision_depth=1,
                      vision_heads=2, vocab_size=50, context_length=8, text_width=32, text_heads=2, text_layers=1)
