"""Print benchmarks/results/*.json as markdown, one section per file, for
the README.

Files that carry a ``tables`` list (core.json, pool.json) are printed as
those tables; any other results file is rendered generically: a dict whose
values are dicts of numbers becomes a table (one row per key), plain
values become a key/value table.

    python benchmarks/report.py [--results DIR] [FILE ...]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

import _util as U


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def _is_row_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(_scalar(v) for v in d.values())


def generic(doc: Any, title: str, out: list[str], depth: int = 0) -> None:
    """Render nested results: tables of row dicts, key/value tables of scalars."""
    if not isinstance(doc, dict):
        if isinstance(doc, list) and doc and all(_is_row_dict(x) for x in doc):
            cols = list(dict.fromkeys(k for x in doc for k in x))
            out.append(f"\n**{title}**\n")
            out.append(U.md_table(cols, [[x.get(c) for c in cols] for x in doc]))
        return
    scalars = {k: v for k, v in doc.items() if _scalar(v) and not (isinstance(v, str) and len(v) > 200)}
    long_text = {k: v for k, v in doc.items() if isinstance(v, str) and len(v) > 200}
    rows = {k: v for k, v in doc.items() if _is_row_dict(v)}
    rest = {k: v for k, v in doc.items() if k not in scalars and k not in rows and k not in long_text}
    if scalars:
        out.append(f"\n**{title}**\n")
        out.append(U.md_table(["key", "value"], [[k, v] for k, v in scalars.items()]))
    if rows:
        cols = list(dict.fromkeys(c for r in rows.values() for c in r))
        out.append(f"\n**{title}{': ' if scalars else ''}{'' if not scalars else 'details'}**\n")
        out.append(U.md_table(["", *cols], [[k, *(r.get(c) for c in cols)] for k, r in rows.items()]))
    for k, v in rest.items():
        if depth < 4:
            generic(v, f"{title} / {k}", out, depth + 1)
    for k, v in long_text.items():
        out.append(f"\n{title} / {k}: {' '.join(v.split())[:600]}")


def render(path: str) -> str:
    name = os.path.basename(path)
    out = [f"## {name}"]
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        out.append(f"\n(unreadable: {exc})")
        return "\n".join(out)
    if isinstance(doc, dict) and isinstance(doc.get("tables"), list):
        m = doc.get("machine", {})
        if m:
            out.append(
                f"\n{m.get('date', '')}: {m.get('nproc')} CPUs ({m.get('cpu_model', '')}), load average "
                f"{m.get('loadavg')} at start, {doc.get('loadavg_end')} at end, Python {m.get('python')}, "
                f"kernel {m.get('kernel')}; {doc.get('seconds')} s{' (--quick)' if doc.get('quick') else ''}."
            )
        for t in doc["tables"]:
            out.append(f"\n### {t['title']}\n")
            out.append(U.md_table(t["columns"], t["rows"]))
            if t.get("note"):
                out.append(f"\n{t['note']}")
    else:
        generic(doc, name.removesuffix(".json"), out)
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=U.RESULTS)
    ap.add_argument("files", nargs="*", help="results files (default: every *.json in --results)")
    args = ap.parse_args()
    files = args.files or sorted(glob.glob(os.path.join(args.results, "*.json")))
    if not files:
        print(f"no results in {args.results}; run benchmarks/run_all.py first", file=sys.stderr)
        return 1
    print("\n\n".join(render(p) for p in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
