"""`diffclip` command line: zero-shot classification, batch embedding, evaluation, checkpoint conversion,
relevance maps, training.

A thin parser: each subcommand lives in diffclip/commands/ (`add_parser` + `run`); a new one is an import and an
entry in COMMANDS. Errors a user can cause (bad paths, unreadable images, empty label lists, offline hub) print
one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
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
                global _distributed_ran
                _distributed_ran = True
                dist.destroy_process_group()


_distributed_ran = False


def entry() -> None:
    """The process entry (`diffclip`, `python -m diffclip`, torchrun): `main`, then exit with its status. After a
    torchrun run the process ends with os._exit once its output is flushed: c10d/gloo threads still being torn down
    at interpreter shutdown can otherwise abort the process ("terminate called without an active exception",
    SIGABRT) after it has printed its one-line error, replacing exit status 2 with a signal (seen under load on
    the 2-core CI machine). Everything the command writes is closed and renamed into place before main returns."""
    code = main()
    if _distributed_ran:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
