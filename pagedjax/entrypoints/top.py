"""``pagedjax top``: a live terminal view of a running server's KV memory.

    pagedjax top --url http://127.0.0.1:8000 [--api-key KEY] [--interval 1]

It polls the server's ``GET /v1/kv`` (pagedjax.kv_view says what each field means) and draws,
with rich: the pool's usage over time (a sparkline), the block map (one cell per block, or per
group of blocks when the pool is larger than the screen, colored by the state most of them are
in), one row per request, the prefix-cache hit rate, swap traffic and tokens/s. Ctrl-C quits.
``--once`` prints one frame and exits (for scripts and captures).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
import urllib.error
import urllib.request

SPARK = "▁▂▃▄▅▆▇█"
# block map state -> (glyph, style); pagedjax.kv_view.BLOCK_STATES / HOST_STATES name them
CELLS = {".": ("·", "grey42"), "h": ("█", "green"), "s": ("█", "magenta"),
         "c": ("▒", "cyan"), "w": ("█", "yellow")}
STATE_STYLES = {"running": "green", "waiting": "white", "swapped": "yellow",
                "preempted": "bold red"}
HISTORY = 240  # polls of pool usage kept for the sparkline


class TopError(ValueError):
    """The server cannot be read; the message says what to change."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the pagedjax server (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("PAGEDJAX_API_KEY"),
                   help="the server's --api-key (default: $PAGEDJAX_API_KEY)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")


def check(args: argparse.Namespace) -> None:
    if not args.interval > 0:
        raise ValueError(f"--interval {args.interval} must be > 0 seconds")
    if not args.url.startswith(("http://", "https://")):
        raise ValueError(f"--url {args.url!r} must start with http:// or https://")


def fetch(url: str, api_key: str | None, timeout: float = 10.0) -> dict:
    """GET ``url``/v1/kv; a ``TopError`` that says what to change when it cannot."""
    endpoint = url.rstrip("/") + "/v1/kv"
    req = urllib.request.Request(endpoint, headers={"Authorization": f"Bearer {api_key}"}
                                 if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:  # noqa: BLE001 - not the server's JSON error: say the status only
            message = e.reason
        if e.code == 401:
            raise TopError(f"{url} refused the API key ({message}): pass the server's key with "
                           "--api-key or $PAGEDJAX_API_KEY") from None
        if e.code == 404:
            raise TopError(f"{endpoint} does not exist: is {url} a pagedjax server?") from None
        raise TopError(f"{endpoint} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TopError(f"cannot reach {url} ({reason}): is `pagedjax serve` running there? "
                       "(--url)") from None
    except json.JSONDecodeError:
        raise TopError(f"{endpoint} did not answer JSON: is {url} a pagedjax server?") from None


# ---- rendering --------------------------------------------------------------------------------
def sparkline(values, width: int) -> str:
    """``values`` in [0, 1], the newest last, one character each (the last ``width``)."""
    return "".join(SPARK[min(int(v * len(SPARK)), len(SPARK) - 1)] for v in list(values)[-width:])


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def block_cells(block_map: str, cells: int) -> tuple[str, int]:
    """The map in at most ``cells`` cells: (one state per cell, blocks per cell). A cell of
    several blocks shows the state most of them are in."""
    per = max(1, -(-len(block_map) // max(cells, 1)))
    if per == 1:
        return block_map, 1
    out = []
    for i in range(0, len(block_map), per):
        seg = block_map[i:i + per]
        out.append(max(set(seg), key=seg.count))
    return "".join(out), per


def _map_text(states: str, width: int):
    from rich.text import Text

    text = Text()
    for row in range(0, len(states), width):
        line = states[row:row + width]
        i = 0
        while i < len(line):  # one span per run of equal states
            j = i
            while j < len(line) and line[j] == line[i]:
                j += 1
            glyph, style = CELLS.get(line[i], ("?", "red"))
            text.append(glyph * (j - i), style=style)
            i = j
        if row + width < len(states):
            text.append("\n")
    return text


def _map_panel(title: str, block_map: str, legend: dict, counts: dict, width: int, rows: int):
    from rich.panel import Panel
    from rich.text import Text

    inner = max(width - 4, 8)
    states, per = block_cells(block_map, inner * rows)
    key = Text()
    for code, name in legend.items():
        glyph, style = CELLS.get(code, ("?", "red"))
        key.append(f"{glyph} ", style=style).append(f"{name} {counts.get(name, 0)}  ")
    scale = f"1 cell = {per} blocks" if per > 1 else "1 cell = 1 block"
    return Panel(Text.assemble(_map_text(states, inner), "\n", key),
                 title=title, subtitle=scale, title_align="left", subtitle_align="right",
                 width=width)


def render(view: dict, usage: collections.deque, url: str, width: int, height: int,
           error: str | None = None):
    """One frame of ``pagedjax top`` for a ``width`` x ``height`` screen."""
    from rich.console import Group
    from rich.text import Text

    pool, pre, pc, sw = view["pool"], view["preemptions"], view["prefix_cache"], view["swap"]
    tput = view.get("throughput") or {}
    lines = [Text.assemble(("pagedjax top ", "bold"), url, f"  step {view['step']}  ",
                           time.strftime("%H:%M:%S", time.localtime(view["built_at"])))]
    if error:
        lines.append(Text(f"connection lost, showing the last view: {error}", style="bold red"))
    lines.append(Text(
        f"KV pool {pool['used']}/{pool['num_blocks']} used ({pool['usage']:.0%})  "
        f"held {pool['held']}  shared {pool['shared']}  free {pool['free']} "
        f"({pool['cached']} cached)  [{pool['block_size']} tokens, "
        f"{_bytes(pool['bytes_per_block'])} a block]"))
    spark_w = max(width - 16, 10)
    lines.append(Text.assemble("usage ", (sparkline(usage, spark_w), "green"),
                               f" {pool['usage']:.0%}"))
    lines.append(Text(
        f"requests {len(view['requests'])}  sequences: running {view['num_running']}  "
        f"waiting {view['num_waiting']}  swapped {view['num_swapped']}"))
    lines.append(Text(
        f"preemptions {pre['total']} (swap {pre['swap']}, recompute {pre['recompute']})  "
        f"swap out {sw['out_blocks']} blocks ({_bytes(sw['out_bytes'])}), "
        f"in {sw['in_blocks']} ({_bytes(sw['in_bytes'])})"))
    hit = (f"{pc['hit_rate']:.1%} ({pc['hits']:,}/{pc['queries']:,} tokens)"
           if pc["hit_rate"] is not None else "-" if pc["enabled"] else "off")

    def rate(key):
        v = tput.get(key)
        return "-" if v is None else f"{v:,.1f}"

    lines.append(Text(f"prefix cache hits {hit}  tok/s prompt {rate('prompt_tokens_per_s')}  "
                      f"generation {rate('generation_tokens_per_s')}"))
    parts: list = list(lines)
    left = height - len(lines)
    host = view.get("host")
    map_rows = max(1, min(-(-pool["num_blocks"] // max(width - 4, 8)), max(left // 4, 1)))
    parts.append(_map_panel("device blocks", pool["block_map"], pool["legend"],
                            {"free": pool["free"] - pool["cached"], "held": pool["held"],
                             "shared": pool["shared"], "cached": pool["cached"]},
                            width, map_rows))
    left -= map_rows + 3
    if host is not None:
        host_rows = max(1, min(-(-host["num_blocks"] // max(width - 4, 8)), 2))
        parts.append(_map_panel("host swap blocks", host["block_map"], host["legend"],
                                {"swapped": host["used"],
                                 "free": host["num_blocks"] - host["used"]}, width, host_rows))
        left -= host_rows + 3
    parts.append(_requests_table(view["requests"], max(left - 4, 1), width))
    return Group(*parts)


COLUMNS = {"state": 9, "n": 6, "prompt": 6, "gen": 5, "blocks": 6, "shared": 6, "host": 4,
           "preempt": 7}  # the request table's columns after the id: their widths


def _requests_table(rows: list[dict], fits: int, width: int):
    from rich.table import Table
    from rich.text import Text

    table = Table(padding=(0, 1, 0, 0), header_style="bold")
    # the id takes what the other columns leave (each has a border and a space)
    table.add_column("request", no_wrap=True, overflow="ellipsis",
                     width=max(width - sum(COLUMNS.values()) - 2 * len(COLUMNS) - 3, 8))
    for name, w in COLUMNS.items():
        table.add_column(name, justify="left" if name == "state" else "right", no_wrap=True,
                         width=w)
    shown = rows if len(rows) <= fits else rows[:fits - 1]
    for r in shown:
        n = f"beam {r['beam_width']}" if r["beam_width"] else str(r["n"])
        table.add_row(Text(r["id"]), Text(r["state"], style=STATE_STYLES.get(r["state"], "")), n,
                      str(r["prompt_tokens"]), str(r["generated_tokens"]), str(r["blocks_held"]),
                      str(r["blocks_shared"]), str(r["blocks_on_host"]), str(r["preemptions"]))
    if len(shown) < len(rows):
        table.add_row(f"... {len(rows) - len(shown)} more", *[""] * 8)
    return table


# ---- the loop ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    usage: collections.deque = collections.deque(maxlen=HISTORY)
    view = fetch(args.url, args.api_key)  # a wrong URL or key fails here, before the screen
    usage.append(view["pool"]["usage"])

    def frame(error=None):
        w, h = console.size
        return render(view, usage, args.url, w, h, error)

    if args.once:
        console.print(frame())
        return
    try:
        with Live(frame(), console=console, screen=True, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                error = None
                try:
                    view = fetch(args.url, args.api_key)
                    usage.append(view["pool"]["usage"])
                except TopError as e:  # the server went away: keep the last view, say so
                    error = str(e)
                live.update(frame(error), refresh=True)
    except KeyboardInterrupt:
        pass
