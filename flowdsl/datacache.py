"""Where decoded data is cached, and how a cache is written so that a kill never leaves one that
looks complete.

A cache is a folder holding `samples.bin` (M samples, raw, C order) and `index.json` (what each
slot holds, keyed by the source and its decoding settings). index.json is written last, to a
temporary name and renamed: a folder without it is rebuilt. A lock file serialises builders
(several processes, e.g. MPI ranks, wait for one build instead of racing).

Location: $FLOWDSL_DATA_CACHE, else ~/.cache/flowdsl/data ($XDG_CACHE_HOME respected);
FLOWDSL_NO_USER_CACHE=1 keeps it beside the run, in ./.flowdsl-cache/data."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

FORMAT = 1   # bump when the layout or the decoding changes: old caches are then ignored


def root() -> Path:
    env = os.environ.get("FLOWDSL_DATA_CACHE", "").strip()
    if env:
        return Path(os.path.expanduser(env))
    if os.environ.get("FLOWDSL_NO_USER_CACHE") == "1":
        return Path.cwd() / ".flowdsl-cache" / "data"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flowdsl" / "data"


def folder_for(name, key: dict) -> Path:
    """The cache folder of one source: a readable name plus a hash of everything that defines it."""
    digest = hashlib.sha1(json.dumps(dict(key, format=FORMAT), sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))[:40] or "data"
    return root() / f"{safe}-{digest}"


class Lock:
    """An exclusive lock on a cache folder (flock: released if the holder dies)."""

    def __init__(self, folder: Path):
        self.path = folder / "lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def read_index(folder: Path, key: dict):
    """The folder's index if it is complete and matches key (and its data file has the size the
    index says), else None."""
    try:
        with open(folder / "index.json") as f:
            index = json.load(f)
        if index.get("format") != FORMAT or index.get("key") != key:
            return None
        size = os.path.getsize(folder / "samples.bin")
        if size != index["slots"] * index["sample_bytes"]:
            return None
        return index
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_index(folder: Path, index: dict):
    index = dict(index, format=FORMAT)
    tmp = folder / f"index.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "index.json")


def remove_index(folder: Path):
    try:
        os.remove(folder / "index.json")
    except FileNotFoundError:
        pass


def sweep(folder: Path):
    """Temporary files of builders that were killed."""
    for p in folder.glob("*.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)          # still running: leave it
        except (ValueError, ProcessLookupError):
            try:
                p.unlink()
            except OSError:
                pass
        except PermissionError:
            pass
