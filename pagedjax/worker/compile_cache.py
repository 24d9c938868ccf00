"""The persistent compilation cache: compiled step programs kept on disk between runs.

Most of a server's start-up is compiling its step buckets (``--precompile``); with this cache a
second start (a restart after a crash, a deploy) loads them from disk instead. JAX's own
persistent cache does the work; this module chooses its directory (``--compilation-cache-dir``,
else ``$PAGEDJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/pagedjax/jax``, else
``~/.cache/pagedjax/jax``), keeps every program however fast it compiled (JAX by default keeps
only those that took over a second) and counts hits and misses, so the start-up log can say how
many programs came from disk.

On by default on a GPU or TPU; off on the CPU, where the step programs compile in well under a
second and separate runs (tests) must not share state through the disk; ``--compilation-cache``
turns it on there, ``--no-compilation-cache`` off everywhere. JAX keys an entry by the program,
the compiler options and the jax/jaxlib versions, so a stale entry is never used.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import jax
import jax.monitoring

logger = logging.getLogger(__name__)

_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_counts = {_HIT: 0, _MISS: 0}
_lock = threading.Lock()
_listening = False


def default_dir() -> Path:
    if os.environ.get("PAGEDJAX_CACHE_DIR"):
        return Path(os.environ["PAGEDJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pagedjax" / "jax"


def _count(event: str, **_) -> None:
    if event in _counts:
        with _lock:
            _counts[event] += 1


def setup(enabled: bool | None, directory: str | None) -> Path | None:
    """Point JAX's persistent cache at the directory (before the engine compiles anything of
    its own); returns it, or None when the cache stays off. ``enabled`` None: on unless the
    backend is the CPU."""
    global _listening
    if enabled is None:
        enabled = jax.default_backend() != "cpu"
    if not enabled:
        return None
    path = Path(directory).expanduser() if directory else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--compilation-cache-dir {str(path)!r} cannot be created ({e}): "
                         "choose a writable directory or pass --no-compilation-cache") from e
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    return path


def counts() -> tuple[int, int]:
    """(programs loaded from the persistent cache, programs compiled and stored) so far in this
    process."""
    with _lock:
        return _counts[_HIT], _counts[_MISS]
