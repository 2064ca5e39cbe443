"""Output files that appear complete or not at all (written under temporary names in the destination folder and
moved into place together once everything is written), created with the permissions the umask gives; an
advisory lock so that two runs cannot write one folder; output paths checked before any work is done."""

from __future__ import annotations

import os
import tempfile


class OutputError(ValueError):
    """An output path that cannot be written (reported as a one-line user error)."""


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what open() would create (mkstemp creates 0600 whatever the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def check_output_file(path: str, flag: str) -> str:
    """A file the run will write at the end: its folder must exist and be writable and the path must not be a
    folder, checked before the model loads so that no work is lost to a typo. Returns the absolute path."""
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise OutputError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise OutputError(f"{flag} folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} folder is not writable: {folder}")
    return full


def remove_temporaries(folder: str, prefixes) -> None:
    """Remove `.NAME.*.part` files an interrupted run left (call only while holding the folder's lock)."""
    for n in os.listdir(folder):
        if n.endswith(".part") and any(n.startswith(f".{p}.") for p in prefixes):
            os.remove(os.path.join(folder, n))


class FolderLock:
    """An advisory lock (flock on `folder/.diffclip.lock`) held while a run writes the folder: a second run is
    refused at once instead of mixing its files with the first's. The lock file is removed on release; a lock
    taken on a file that was removed meanwhile is not trusted (the inode check), so removal is safe."""

    NAME = ".diffclip.lock"

    def __init__(self, folder: str):
        self.path = os.path.join(folder, self.NAME)
        self.fd = None

    def acquire(self) -> "FolderLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, umask_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:  # released and removed before we locked it
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            raise OutputError(f"{os.path.dirname(self.path)} is being written by another run (lock file "
                              f"{self.path}); wait for it or choose another folder") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.remove(self.path)  # while still locked: a run that opens it next sees the inode change
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


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
            os.fchmod(fd, umask_mode())  # mkstemp's 0600 would survive os.replace: others could not read outputs
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
        mode = umask_mode()
        for name, path in self.tmp.items():
            os.chmod(path, mode)  # again: a writer may have replaced the temporary file (safetensors does)
            os.replace(path, os.path.join(self.folder, name))
        return False
