"""Render benchmark results into the documentation.

Every ``benchmarks/results/*.json`` that has a ``"tables"`` list is rendered as markdown and
put between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, where ``NAME`` is the file's stem
(``quality.json`` -> ``quality``, ``speed.json`` -> ``speed``), in the page that holds those
markers: README.md or one of ``docs/*.md`` (``quality`` and ``speed`` are in docs/BENCHMARKS.md,
``tuning_check`` in docs/TUNING.md, ``attribution`` in docs/ATTRIBUTION.md, ``store_memory`` and
``projection`` in docs/SCALING.md). A result whose markers are nowhere is appended at the end of
docs/BENCHMARKS.md. ``--readme PATH`` renders every given file into PATH instead. Other JSON files
are left alone.

The table schema (shared by every benchmark)::

    {"intro": str (optional markdown, rendered first),
     "tables": [{"title": str, "machine": str | dict, "date": str, "command": str,
                 "columns": [str, ...], "rows": [[cell, ...], ...], "notes": [str, ...]}, ...]}

Usage::

    python benchmarks/render.py                                  # results/*.json -> the page of each marker
    python benchmarks/render.py --readme /tmp/README.md out.json # given files only, into one file
    python benchmarks/render.py --print results/speed.json       # print, don't write
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: where a result goes when no page holds its markers
DEFAULT_TARGET = os.path.join(ROOT, "docs", "BENCHMARKS.md")


def pages(root: str = ROOT) -> list[str]:
    """The pages searched for markers: README.md, then docs/*.md."""
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def target_for(name: str, candidates: Sequence[str] | None = None) -> str:
    """The page that holds ``<!-- name:start -->`` (the first of ``candidates``, default :func:`pages`),
    else :data:`DEFAULT_TARGET`."""
    marker = f"<!-- {name}:start -->"
    for page in pages() if candidates is None else candidates:
        if os.path.exists(page):
            with open(page, encoding="utf-8") as fh:
                if marker in fh.read():
                    return page
    return DEFAULT_TARGET


def _machine(m: Any) -> str:
    if isinstance(m, dict):
        keys = ("cpu_model", "cpu_count", "cuda", "torch", "platform")
        parts = []
        for k in keys:
            if m.get(k) is not None:
                parts.append(f"{k.replace('_', ' ')}: {m[k]}" if k != "cpu_model" else str(m[k]))
        return ", ".join(parts) or json.dumps(m)
    return str(m) if m else "unknown machine"


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_table(table: dict[str, Any], level: int = 4) -> str:
    """One table as markdown: a heading, the machine and date line, the command, the grid, notes."""
    cols = [str(c) for c in table.get("columns", [])]
    rows = table.get("rows", [])
    width = max([len(cols)] + [len(r) for r in rows]) if (cols or rows) else 0
    cols = cols + [""] * (width - len(cols))
    out = [f"{'#' * level} {table.get('title', 'Results')}", ""]
    meta = f"*Machine: {_machine(table.get('machine'))}. Date: {table.get('date', 'unknown')}.*"
    out += [meta, ""]
    if table.get("command"):
        out += [f"Command: `{table['command']}`", ""]
    if width:
        out.append("| " + " | ".join(_cell(c) for c in cols) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (width - 1)) + "|")
        for r in rows:
            r = list(r) + [""] * (width - len(r))
            out.append("| " + " | ".join(_cell(c) for c in r) + " |")
        out.append("")
    for note in table.get("notes") or []:
        out.append(f"- {note}")
    if table.get("notes"):
        out.append("")
    return "\n".join(out)


def render_document(doc: dict[str, Any]) -> str:
    """The optional ``intro`` (markdown) followed by every table."""
    parts = [str(doc["intro"]).rstrip() + "\n"] if doc.get("intro") else []
    parts += [render_table(t) for t in doc.get("tables", [])]
    return "\n".join(parts).rstrip() + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the part between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced by
    ``body`` (the markers are appended at the end when missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def _load(path: str) -> dict[str, Any] | None:
    with open(path, encoding="utf-8") as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as err:
            print(f"skip {path}: not JSON ({err})", file=sys.stderr)
            return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("tables"), list) else None


def _write(page: str, sections: Sequence[tuple]) -> None:
    with open(page, encoding="utf-8") as fh:
        text = fh.read()
    for name, body in sections:
        text = replace_section(text, name, body)
    tmp = page + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, page)


def render_files(files: Sequence[str], readme: str | None = None, print_only: bool = False,
                 targets: dict[str, str] | None = None) -> list[str]:
    """Render each file that has ``tables`` into ``readme`` when given, else into the page that
    holds its markers (:func:`target_for`); returns the section names written. ``targets``
    (optional) receives ``{name: page}``."""
    done: list[str] = []
    by_page: dict[str, list[tuple]] = {}
    for path in files:
        doc = _load(path)
        if doc is None:
            continue
        name = os.path.splitext(os.path.basename(path))[0]
        body = render_document(doc)
        if print_only:
            print(f"<!-- {name} -->\n{body}")
        else:
            page = readme or target_for(name)
            by_page.setdefault(page, []).append((name, body))
            if targets is not None:
                targets[name] = page
        done.append(name)
    for page, sections in by_page.items():
        _write(page, sections)
    return done


def main(argv: Sequence[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description="Render benchmarks/results/*.json tables into the README and docs/.")
    ap.add_argument("files", nargs="*", help="result files (default: benchmarks/results/*.json)")
    ap.add_argument("--readme", default=None, metavar="PATH",
                    help="render every file into PATH (default: each into the page that holds its markers)")
    ap.add_argument("--print", dest="print_only", action="store_true", help="print the markdown instead")
    opts = ap.parse_args(argv)
    files = opts.files or sorted(glob.glob(os.path.join(HERE, "results", "*.json")))
    targets: dict[str, str] = {}
    done = render_files(files, opts.readme, opts.print_only, targets)
    if not opts.print_only:
        for name in done:
            print(f"rendered {name} into {os.path.relpath(targets[name], ROOT)}")
        if not done:
            print("rendered nothing")
    return done


if __name__ == "__main__":
    main()
