"""The compile cache volume, checked before a start compiles into it.

Inductor writes its generated code, the compiled libraries and their caches into
``TORCHINDUCTOR_CACHE_DIR`` as it compiles; a volume that runs out of space or turns read-only
then fails the compile, and the start with it. The cache only buys the next start its head
start, so a volume that cannot take a compile costs exactly that: this start compiles in the
container's own scratch space (``/tmp``, an emptyDir), says why in its log and in /readyz's
``optimizations.compile_cache_skipped``, and serves. It still loads what the volume holds
(``optimizations.compile_cache_read``), as a start told to leave the volume as it is does
(``compile_cache_read_only``: serving pods whose precompile Job writes it).

Each start also removes the keyed files (``artifacts/KEY.*``, ``aot/KEY*``) that no server has
used for ``compile_cache_retention_days``, after marking its own key's as used: an upgrade
changes the key (the torch version is part of it), and without this the old ones stay on the
volume for ever. A server marks its key again while it serves (``KeepMarked``: every hour,
or twice within a shorter retention), so a service that runs for longer than the retention
without a restart keeps its files for the next replica it scales to. Inductor's own cache
folders are not keyed by us and are left as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
# The folders of compile_cache_dir whose files are named for their key (KEY.bin, KEY-SHAPE.pt2).
KEYED = ("artifacts", "aot")

# What one start may write: inductor's code and libraries for every admitted shape, the
# artifact bundle, AOTInductor packages. Hundreds of MiB for SDXL on a GPU; a floor well above.
MIN_FREE_BYTES = 1 << 30


def unusable(directory: Path, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why a start cannot compile into ``directory``, or None when it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        return f"cannot write to {directory}: {exc}"
    if free < min_free:
        return (f"{directory} has {free >> 20} MiB free, less than the {min_free >> 20} MiB "
                "a compile may write")
    return None


def mark_used(directory: Path, key: str) -> None:
    """Mark a key's files as used now (their mtime), so no start prunes them as stale."""
    for sub in KEYED:
        for path in (directory / sub).glob(f"{key}*"):
            with contextlib.suppress(OSError):  # a read-only volume: nothing is pruned there
                os.utime(path)


# A write cut short (its process killed mid-way) leaves its partial file, named so; any
# write takes far less than this.
PARTIAL_PREFIX = ".partial-"
PARTIAL_MAX_AGE_S = 3600


def prune(directory: Path, keep: str, days: float) -> list[str]:
    """Remove the keyed files of other keys than ``keep`` unused for ``days`` (0: none), and
    partial files an hour old; their names.

    Replicas of other services may share the volume and prune at once: a file another
    start removed first is no error, and a key still in use has been marked by its start.
    """
    now = time.time()
    older = now - days * 86400 if days > 0 else None
    removed = []
    for sub in KEYED:
        for path in sorted((directory / sub).glob("*")):
            if not path.is_file():
                continue
            partial = path.name.startswith(PARTIAL_PREFIX)
            if not partial and (older is None or path.name.startswith(keep)):
                continue
            try:
                if path.stat().st_mtime < (now - PARTIAL_MAX_AGE_S if partial else older):
                    path.unlink()
                    removed.append(f"{sub}/{path.name}")
            except OSError:
                continue
    if removed:
        log.info("compile cache: removed %d file(s) unused for %g days or left partial: %s",
                 len(removed), days, ", ".join(removed))
    return removed


class KeepMarked:
    """Marks a serving key's files as used every ``every_s`` seconds on a thread of its own,
    until ``stop``: a start of another service prunes by the marks alone."""

    def __init__(self, directory: Path, key: str, every_s: float = 3600.0):
        self.directory, self.key, self.every_s = directory, key, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compile-cache-marks",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                mark_used(self.directory, self.key)
            except Exception:  # a volume gone away: marked again at the next round
                log.warning("compile cache: cannot mark key %s as used", self.key, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
