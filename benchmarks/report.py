"""Rewrite the results section of ``benchmarks/README.md`` from ``benchmarks/results/*/*.json``.

    python -m benchmarks.report                 # benchmarks/results -> benchmarks/README.md
    python -m benchmarks.report --results DIR --print   # render any folder to stdout

For every scenario of ``python -m benchmarks``, each results file
(``<device>/<scenario>[-tag].json``, accelerators first) becomes: the device, date, commit and
exact command, its table (``figures.table`` or ``figures.rows``), the summary figures, and its PNG
when one sits beside it.
A scenario with no file says "not yet measured" and how to run it. Only the text between the
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers is replaced.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.__main__ import SCENARIOS
from benchmarks.common import RESULTS, _fmt

README = Path(__file__).parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _files(results: Path, scenario: str) -> list[Path]:
    found = [p for p in results.glob("*/*.json")
             if p.stem == scenario or p.stem.startswith(scenario + "-")]
    found += [p for p in results.glob("*.json")
              if p.stem == scenario or p.stem.startswith(scenario + "-")]
    # accelerators before CPU smoke runs, then by name
    return sorted(found, key=lambda p: (p.parent.name.startswith("cpu"), str(p)))


def _table(rows: list[dict], columns: list[str] | None) -> list[str]:
    if not rows:
        return []
    columns = columns or [c for c in rows[0] if not isinstance(rows[0][c], (dict, list))]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/").replace("\n", " ")
                                     for c in columns) + " |")
    return out


def render_file(path: Path, link_from: Path) -> list[str]:
    rec = json.loads(path.read_text())
    fig = rec.get("figures") or {}
    commit = (rec.get("git_commit") or "")[:10] or "unknown"
    lines = [f"**{rec.get('device', path.parent.name)}**, {rec.get('date', '?')}, commit "
             f"`{commit}`:", "", "```", rec.get("command", "?"), "```", ""]
    table = fig.get("table")
    if table:
        lines += _table(table.get("rows", []), table.get("columns"))
    elif isinstance(fig.get("rows"), list):
        lines += _table(fig["rows"], None)
    summary = rec.get("summary") or {}
    if summary:
        lines += ["", "Summary: " + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in summary.items())]
    png = path.with_suffix(".png")
    if png.exists():
        rel = os.path.relpath(png, link_from.parent)
        lines += ["", f"![{path.stem}]({rel})"]
    return lines + [""]


def render(results: Path = RESULTS, link_from: Path = README) -> str:
    lines = []
    for scenario in SCENARIOS:
        lines += [f"### {scenario}", ""]
        files = _files(results, scenario)
        if not files:
            lines += [f"_Not yet measured._ Run `python -m benchmarks {scenario} --help`.", ""]
        for path in files:
            try:
                lines += render_file(path, link_from)
            except (OSError, ValueError) as e:
                lines += [f"_{path.name}: unreadable ({e})_", ""]
    return "\n".join(lines).rstrip() + "\n"


def update(readme: Path = README, results: Path = RESULTS) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + render(results, readme) + END + tail)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--print", action="store_true", help="print instead of rewriting the README")
    args = p.parse_args(argv)
    if args.print:
        print(render(args.results, args.readme))
    else:
        update(args.readme, args.results)


if __name__ == "__main__":
    main()
