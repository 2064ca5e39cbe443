"""Install script for DiffCLIP-Triton: the fused differential-attention kernel (`kernels`) and the DiffCLIP model
(`diffclip`).

`pip install -e .` gives the kernel and the model's eager/SDPA paths; `.[clip]` adds the tokenizer, image
preprocessing, checkpoint download and the `diffclip` command line; `.[eval]` adds LAION's CLIP Benchmark for
`diffclip eval --dataset NAME`; `.[train]` adds webdataset for `diffclip train`; `.[lm]` adds
transformers (DiffLlama); `.[dev]` adds everything plus
the test and benchmark tools.
"""

from pathlib import Path

from setuptools import find_packages, setup

CLIP = [
    "open_clip_torch>=2.20",  # CLIP BPE tokenizer (ships its vocabulary)
    "torchvision",  # validation transform
    "huggingface_hub>=0.20",  # checkpoint download + cache
    "safetensors>=0.4",
    "pillow",
    "numpy",
    "tqdm",
    "matplotlib",  # `diffclip explain` draws its figure
]
# `--dataset NAME` of `diffclip eval`: LAION's CLIP Benchmark (the paper's protocol). Its ImageNetV2 loader imports
# `requests` without declaring it, and its builder imports that loader for every dataset.
EVAL = ["clip-benchmark>=1.6", "requests"]
# `diffclip train`: webdataset's tar reader for img2dataset shards (TensorBoard logging is used only if installed:
# pip install tensorboard).
TRAIN = ["webdataset>=0.2"]
# Language models: transformers' DiffLlama (kernels.integrations.transformers.use_diff_attn; tests/integrations, incl.
# the `kernels` name-clash check). The floor is the version the integration was tested with: it relies on
# masking_utils' mask interface and DiffLlama's attention forward as of 5.x, which older releases lack or differ in.
LM = ["transformers>=5.24"]
TEST = ["pytest>=7", "pytest-benchmark>=4"]
BENCH = ["matplotlib"]

setup(
    name="diffclip-triton",
    version="0.1.0",
    description="Fused Triton differential attention (Differential Transformer / DiffCLIP) and the DiffCLIP model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "diffclip", "diffclip.*", "benchmarks"]),
    install_requires=[
        # Checkpoints are untrusted: torch.load(weights_only=True) had known bypasses before 2.10 —
        # CVE-2025-32434 / GHSA-53q9-r3pm-6pq6 (remote code execution, fixed in 2.6.0) and CVE-2026-24747 /
        # GHSA-63cw-57p8-fm3p (heap corruption via SETITEM(S) and storage-size mismatches, fixed in 2.10.0).
        # 2.10 also covers torch.library.custom_op (kernels/ops.py, needs >= 2.4).
        "torch>=2.10",
        "einops",
        # Triton ships Linux wheels only; elsewhere `kernels` imports fine and only the Triton path errors.
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        "clip": CLIP,
        "test": TEST,
        "bench": BENCH,
        "eval": CLIP + EVAL,
        "train": CLIP + TRAIN,
        "lm": LM,
        "dev": CLIP + EVAL + TRAIN + TEST + BENCH + LM,
    },
    entry_points={"console_scripts": ["diffclip = diffclip.cli:entry"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
    ],
)
