"""`python -m diffclip ...`: the `diffclip` command line (also under torchrun)."""

from .cli import entry

entry()
