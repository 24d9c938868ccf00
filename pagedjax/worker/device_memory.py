"""How much device memory the engine sizes itself from, and JAX's allocator set up to match.

``--gpu-memory-utilization 0.9`` means what it means in vLLM: 90% of the device's total memory is
this engine's, for weights, the step's activations and the KV pool. JAX's GPU allocator, left
alone, is capped at ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.75 of the device, and its
``memory_stats()["bytes_limit"]`` reports only that cap, so an engine sizing itself from it would
get 0.9 x 0.75 = 0.675 of the device. XLA reads the fraction when the backend starts (the first
``jax.devices()``, not ``import jax``) and sets ``bytes_limit`` = fraction x total, so
:func:`configure_allocator`, called before that, sets the fraction to the utilisation, and
:func:`device_bytes` reads the total back as ``bytes_limit`` / fraction.

A fraction the user set (``XLA_CLIENT_MEM_FRACTION`` or ``XLA_PYTHON_CLIENT_MEM_FRACTION``) is
kept, and the share it gives JAX is then the device the utilisation applies to (how
``benchmarks native-vs-paged`` simulates a smaller card). ``XLA_PYTHON_CLIENT_PREALLOCATE`` and
``XLA_PYTHON_CLIENT_ALLOCATOR`` are never touched. The fraction pagedjax sets is recorded in
``PAGEDJAX_MEM_FRACTION`` too, so that a child process inheriting the environment can tell it
from a user's. On a TPU ``bytes_limit`` is the whole memory already (the fraction is a GPU
setting).
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

GiB = 1 << 30

FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"  # read by every jaxlib (a deprecated alias since 0.10)
NEW_FRACTION = "XLA_CLIENT_MEM_FRACTION"  # jaxlib >= 0.10; setting both is an error there
MARKER = "PAGEDJAX_MEM_FRACTION"  # the fraction pagedjax set, so that it is not taken for a user's
XLA_DEFAULT_FRACTION = 0.75
USER_VARS = (NEW_FRACTION, FRACTION, "XLA_PYTHON_CLIENT_PREALLOCATE",
             "XLA_PYTHON_CLIENT_ALLOCATOR")


def _set_by_pagedjax(env) -> bool:
    return env.get(FRACTION) is not None and env.get(FRACTION) == env.get(MARKER)


def user_fraction(env=None) -> tuple[str, str] | None:
    """(variable, value) of a memory fraction the user set, or None."""
    env = os.environ if env is None else env
    if env.get(NEW_FRACTION):
        return NEW_FRACTION, env[NEW_FRACTION]
    if env.get(FRACTION) and not _set_by_pagedjax(env):
        return FRACTION, env[FRACTION]
    return None


def backend_started() -> bool:
    """Whether JAX has created its backends (and read the allocator settings) in this process."""
    xb = sys.modules.get("jax._src.xla_bridge")  # not imported: nothing can have started
    return bool(xb is not None and getattr(xb, "backends_are_initialized", lambda: False)())


def configure_allocator(gpu_memory_utilization: float, env: MutableMapping | None = None,
                        started: bool | None = None) -> str:
    """Give JAX's GPU allocator ``gpu_memory_utilization`` of the device, unless the user chose
    its fraction or the backend already started. Returns (and logs) what it did."""
    env = os.environ if env is None else env
    started = backend_started() if started is None else started
    kept = ", ".join(f"{k}={env[k]}" for k in USER_VARS[2:] if env.get(k))
    kept = f" ({kept} kept)" if kept else ""
    user, value = user_fraction(env), f"{gpu_memory_utilization:g}"
    level = logging.INFO
    if user is not None:
        msg = (f"JAX GPU allocator: {user[0]}={user[1]} set by you{kept}: JAX gets that share of "
               f"the device and --gpu-memory-utilization {gpu_memory_utilization} applies within "
               "it")
    elif _set_by_pagedjax(env) and (started or env[FRACTION] == value):
        msg = f"JAX GPU allocator: {FRACTION}={env[FRACTION]}, set by pagedjax{kept}"
        level = logging.DEBUG  # said when it was set
    elif started:
        fraction = env.get(FRACTION) or f"{XLA_DEFAULT_FRACTION} (JAX's default)"
        msg = (f"JAX GPU allocator: the backend had started before pagedjax could configure it, "
               f"so it keeps {FRACTION}={fraction}")
    else:
        env[FRACTION] = env[MARKER] = value
        msg = (f"JAX GPU allocator: {FRACTION}={value} from --gpu-memory-utilization (JAX's "
               f"default is {XLA_DEFAULT_FRACTION}){kept}")
    # once the backend runs on the CPU, none of this applies: say it only with -v
    jax = sys.modules.get("jax")
    if started and jax is not None and jax.default_backend() == "cpu":
        level = logging.DEBUG
    logger.log(level, msg)
    return msg


def device_bytes(device, env=None) -> int | None:
    """The memory ``--gpu-memory-utilization`` is a fraction of, for one device: its total on
    a GPU whose allocator fraction pagedjax set, the allocator's limit otherwise (a user's
    fraction, or JAX's default 0.75 when the backend started first: logged as a warning); None on
    the CPU. ``device`` is anything with ``platform`` and ``memory_stats()`` (tests pass a fake)."""
    env = os.environ if env is None else env
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(
            f"the {device.platform} device reports no memory limit (XLA_PYTHON_CLIENT_ALLOCATOR="
            f"{env.get('XLA_PYTHON_CLIENT_ALLOCATOR', 'default')}?), so the KV pool cannot be "
            "sized from --gpu-memory-utilization: pass --kv-cache-memory-bytes or "
            "--num-gpu-blocks-override, or use JAX's default allocator")
    limit = int(stats["bytes_limit"])
    if device.platform != "gpu":
        return limit  # a TPU's limit is its whole memory
    if _set_by_pagedjax(env):
        return round(limit / float(env[FRACTION]))
    if user_fraction(env) is None:
        logger.warning(
            "JAX's allocator is capped at %.2f GiB, its default %s of the device, because JAX "
            "started before pagedjax could set %s: the KV pool gets --gpu-memory-utilization of "
            "that cap. Create the engine before other JAX work, or set %s yourself.",
            limit / GiB, XLA_DEFAULT_FRACTION, FRACTION, FRACTION)
    return limit
