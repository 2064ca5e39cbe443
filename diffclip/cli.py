"""`diffclip` command line: zero-shot classification, batch embedding, evaluation, checkpoint conversion,
relevance maps, training.

A thin parser: each subcommand lives in diffclip/commands/ (`add_parser` + `run`); a new one is an import and an
entry in COMMANDS. Errors a user can cause (bad paths, unreadable images, empty label lists, offline hub) print
one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from .commands import convert, embed, eval as eval_command, explain, train, zero_shot
from .distributed import PeerFailed
from .commands.common import UsageError  # noqa: F401  (re-exported: the CLI's user-error type)

COMMANDS = (zero_shot, embed, eval_command, convert, explain, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffclip", description="DiffCLIP: zero-shot, embeddings, conversion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PeerFailed:  # torchrun: another rank failed and printed why; this one ends quietly
        return 0
    except (UsageError, FileNotFoundError, ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"diffclip: error: {e}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
