"""Output files that appear complete or not at all: written under temporary names in the destination folder and
moved into place together once everything is written."""

from __future__ import annotations

import os
import tempfile


class AtomicOutputs:
    """Files written under temporary names in the destination folder and moved into place together only when all
    are complete; outputs of an earlier run that this run does not write are removed, so a folder never mixes runs.
    On failure nothing of this run is left behind."""

    def __init__(self, folder: str, names, stale=()):
        self.folder, self.names, self.stale = folder, list(names), list(stale)
        self.tmp = {}

    def __enter__(self):
        for name in self.names:
            fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=self.folder)
            os.close(fd)
            self.tmp[name] = path
        return self

    def path(self, name: str) -> str:
        return self.tmp[name]

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for path in self.tmp.values():
                if os.path.exists(path):
                    os.remove(path)
            return False
        for name in self.stale:
            target = os.path.join(self.folder, name)
            if name not in self.tmp and os.path.exists(target):
                os.remove(target)
        for name, path in self.tmp.items():
            os.replace(path, os.path.join(self.folder, name))
        return False
