"""``mmkernels bench compare BASELINE.json NEW.json``: the performance gate.

Matches cases by key and compares median times: a case whose median grew by more than
``--threshold`` (default 0.10 = 10 %) is a regression, and any regression fails the gate
(exit code 1). Every case is printed with its change, not only the failures, so a reviewer sees
drift that stays under the threshold too.

Reads three formats:

- ``mmkernels bench ... --json`` files (``cases[].key``, ``ms_p50``),
- ``benchmarks/bench_attention.py`` files (same fields),
- pytest-benchmark ``--benchmark-json`` files (``benchmarks[].fullname``; the time is
  ``extra_info.ms_p50`` — the CUDA-event median the suite records on a GPU — when both files have
  it, else ``stats.median``).

Cases only in the new file are listed as ``new``; cases of the baseline that the new run lacks
or skipped are ``missing`` (a failure only with ``--fail-on-missing``: a CI box without
flash-attn should not fail the gate for it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["compare", "load", "main"]


def load(path: str | Path) -> tuple[dict[str, Any], dict[str, dict]]:
    """(metadata, {key: {"ms": median ms, "ms_cuda": CUDA-event ms or None}}) of a results file."""
    doc = json.loads(Path(path).read_text())
    cases: dict[str, dict] = {}
    if isinstance(doc, dict) and "benchmarks" in doc:  # pytest-benchmark
        mi = doc.get("machine_info", {}) or {}
        device = mi.get("mmkernels_device") or (mi.get("cpu") or {}).get("brand_raw")
        meta = {"format": "pytest-benchmark", "device": device,
                "commit": (doc.get("commit_info") or {}).get("id") or mi.get("mmkernels_commit"),
                "date": doc.get("datetime")}
        for b in doc["benchmarks"]:
            extra = b.get("extra_info") or {}
            ms = (b.get("stats") or {}).get("median")
            # extra_info.key (op/preset/case/dtype/mode/backend) is the key `mmkernels bench --json` uses too
            cases[extra.get("key") or b.get("fullname") or b["name"]] = {
                "ms": ms * 1e3 if isinstance(ms, (int, float)) else None,
                "ms_cuda": extra.get("ms_p50") if isinstance(extra.get("ms_p50"), (int, float)) else None,
            }
        return meta, cases
    docs = doc if isinstance(doc, list) else [doc]
    meta = {"format": "mmkernels", "device": None, "commit": None, "date": None}
    for d in docs:
        meta["device"] = meta["device"] or (d.get("device") or {}).get("name")
        meta["commit"] = meta["commit"] or d.get("commit") or d.get("git_commit")
        meta["date"] = meta["date"] or d.get("date")
        for r in d.get("cases", []):
            if r.get("status") == "ok" and isinstance(r.get("ms_p50"), (int, float)):
                cases[r["key"]] = {"ms": r["ms_p50"], "ms_cuda": None}
    return meta, cases


def compare(base: dict[str, dict], new: dict[str, dict], threshold: float) -> list[dict]:
    rows = []
    for key in list(base) + [k for k in new if k not in base]:
        b, n = base.get(key), new.get(key)
        row = {"key": key, "base_ms": None, "new_ms": None, "change": None}
        if b is None:
            row.update(new_ms=n["ms"], verdict="new")
        elif n is None or n["ms"] is None:
            row.update(base_ms=b["ms"], verdict="missing")
        else:
            field = "ms_cuda" if b.get("ms_cuda") is not None and n.get("ms_cuda") is not None else "ms"
            bm, nm = b[field], n[field]
            change = nm / bm - 1.0 if bm else None
            verdict = ("regressed" if change is not None and change > threshold else
                       "improved" if change is not None and change < -threshold else "ok")
            row.update(base_ms=bm, new_ms=nm, change=change, verdict=verdict)
        rows.append(row)
    return rows


def _ms(x) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 100 else f"{x:.1f}"


def format_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["case", "baseline ms", "new ms", "change", "verdict"]
    out = []
    for r in rows:
        ch = f"{100 * r['change']:+.1f}%" if isinstance(r.get("change"), float) else "-"
        out.append([r["key"], _ms(r["base_ms"]), _ms(r["new_ms"]), ch, r["verdict"]])
    return head, out


def print_rows(rows: list[dict], title: str, *, plain: bool = False, file=None) -> None:
    file = file or sys.stdout
    head, out = format_rows(rows)
    console = None
    if not plain:
        from .report import _rich_console

        console = _rich_console(file)
    if console is None:
        widths = [max(len(h), *(len(r[i]) for r in out)) if out else len(h) for i, h in enumerate(head)]
        print(title, file=file)
        print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(), file=file)
        for r in out:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                            enumerate(zip(r, widths, strict=True))).rstrip(), file=file)
        return
    from rich.markup import escape
    from rich.table import Table

    colour = {"regressed": "red", "improved": "green", "missing": "yellow", "new": "cyan"}
    from rich import box

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for h in head:
        t.add_column(h, justify="left" if h in ("case", "verdict") else "right", no_wrap=True)
    for r, raw in zip(out, rows, strict=True):
        c = colour.get(raw["verdict"])
        t.add_row(*(escape(x) for x in r[:-1]), f"[{c}]{r[-1]}[/]" if c else r[-1])
    console.print(title, markup=False, highlight=False)
    from .report import print_wide

    print_wide(console, t)


def main(baseline: str, new: str, *, threshold: float = 0.10, fail_on_missing: bool = False,
         plain: bool = False) -> int:
    try:
        bmeta, bcases = load(baseline)
        nmeta, ncases = load(new)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"mmkernels bench compare: cannot read the results: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    rows = compare(bcases, ncases, threshold)
    title = (f"{baseline} ({bmeta.get('device')}, {str(bmeta.get('commit'))[:12]}) -> "
             f"{new} ({nmeta.get('device')}, {str(nmeta.get('commit'))[:12]}); threshold {100 * threshold:.0f}%")
    print_rows(rows, title, plain=plain)
    if bmeta.get("device") and nmeta.get("device") and bmeta["device"] != nmeta["device"]:
        print(f"WARNING: different devices ({bmeta['device']} vs {nmeta['device']}): the timings are not comparable")
    count = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("ok", "improved", "regressed", "missing", "new")}
    fail = count["regressed"] > 0 or (fail_on_missing and count["missing"] > 0)
    print(f"{len(rows)} case(s): {count['regressed']} regressed (> +{100 * threshold:.0f}%), {count['improved']} "
          f"improved, {count['ok']} within ±{100 * threshold:.0f}%, {count['missing']} missing, {count['new']} new"
          f" -> {'FAIL' if fail else 'PASS'}")
    if not rows or (not bcases and not ncases):
        print("nothing to compare: neither file has a timed case")
        return 2
    return 1 if fail else 0
