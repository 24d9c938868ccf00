"""What every scenario shares: the results record (device, versions, commit, command, figures),
the results folder, and a short table printer."""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
_argv: list[str] | None = None  # the scenario's arguments when main() was given them (tests)
_prog = "python -m benchmarks"


def set_argv(argv: list[str], prog: str = "python -m benchmarks") -> None:
    """Record the arguments ``prog`` ran with, for the results' "command" (an experiment runs
    as its own module, not as a scenario of ``python -m benchmarks``)."""
    global _argv, _prog
    _argv, _prog = list(argv), prog


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is just "absent"
        return None


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}-{getattr(d, 'device_kind', d.platform)}".replace(" ", "_").lower()


def environment() -> dict:
    import jax

    # The device machine gets the working tree without .git: its runs pass the commit in.
    commit = os.environ.get("PAGEDJAX_GIT_COMMIT")
    if not commit:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent, timeout=10).stdout.strip()
            commit = out if len(out) == 40 else None
        except Exception:  # noqa: BLE001
            commit = None
    return {
        "device": device_name(),
        "devices": [str(d) for d in jax.devices()],
        "num_devices": jax.device_count(),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "torch", "transformers")},
        "python": platform.python_version(),
        "git_commit": commit,
        "command": " ".join([_prog] + (sys.argv[1:] if _argv is None else _argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def results_dir(out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / device_name()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_result(scenario: str, summary: dict, figures: dict, out: str | None = None,
                 tag: str = "") -> Path:
    """Write ``<results>/<device>/<scenario>[-tag].json`` with the environment and all figures."""
    record = {"scenario": scenario, **environment(), "summary": summary, "figures": figures}
    path = results_dir(out) / f"{scenario}{'-' + tag if tag else ''}.json"
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    logger.info("wrote %s", path)
    return path


def int_list(text: str) -> list[int]:
    """A comma list flag: ``1,8,32``."""
    return [int(x) for x in text.split(",") if x]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return "-" if v is None else str(v)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64: how far a kernel's output is from its reference."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def as_f32(*xs):
    """The arrays upcast to float32 (the reference attention runs in fp32 on the same values)."""
    import jax.numpy as jnp

    return tuple(x.astype(jnp.float32) for x in xs)
