"""``mmkernels bench compare BASELINE.json NEW.json``: the performance gate.

Both files are ``mmkernels bench --json`` results (the pytest-benchmark suite writes the same
document with ``--mmk-json``). Cases are matched by key and their median times compared: a case
whose median grew by more than ``--threshold`` (default 0.10 = 10 %) is a regression, and any
regression fails the gate (exit code 1). Every case is printed with its change, not only the
failures, so a reviewer sees drift under the threshold too. Cases only in the new file are
``new``; cases of the baseline that the new run lacks or did not time are ``missing`` (a failure
only with ``--fail-on-missing``: a CI box without flash-attn should not fail the gate for it).
"""

from __future__ import annotations

import sys

from .report import _ms, read_json

__all__ = ["compare", "main"]


def _medians(doc: dict) -> dict[str, float]:
    return {r["key"]: r["ms_p50"] for r in doc["cases"]
            if r.get("status") == "ok" and isinstance(r.get("ms_p50"), (int, float))}


def compare(base: dict[str, float], new: dict[str, float], threshold: float) -> list[dict]:
    rows = []
    for key in list(base) + [k for k in new if k not in base]:
        b, n = base.get(key), new.get(key)
        change = n / b - 1.0 if b and n is not None else None
        verdict = ("new" if b is None else "missing" if n is None else "regressed" if change > threshold
                   else "improved" if change < -threshold else "ok")
        rows.append({"key": key, "base_ms": b, "new_ms": n, "change": change, "verdict": verdict})
    return rows


def main(baseline: str, new: str, *, threshold: float = 0.10, fail_on_missing: bool = False) -> int:
    try:
        bdoc, ndoc = read_json(baseline), read_json(new)
    except (OSError, ValueError) as exc:
        print(f"mmkernels bench compare: cannot read the results: {exc}", file=sys.stderr)
        return 2
    rows = compare(_medians(bdoc), _medians(ndoc), threshold)
    if not rows:
        print("nothing to compare: neither file has a timed case")
        return 2
    bdev, ndev = bdoc["device"].get("name"), ndoc["device"].get("name")
    print(f"{baseline} ({bdev}, {str(bdoc.get('commit'))[:12]}) -> {new} ({ndev}, {str(ndoc.get('commit'))[:12]}); "
          f"threshold {100 * threshold:.0f}%")
    width = max(len(r["key"]) for r in rows)
    print(f"{'case':<{width}}  {'baseline ms':>11}  {'new ms':>9}  {'change':>8}  verdict")
    for r in rows:
        ch = f"{100 * r['change']:+.1f}%" if r["change"] is not None else "-"
        print(f"{r['key']:<{width}}  {_ms(r['base_ms']):>11}  {_ms(r['new_ms']):>9}  {ch:>8}  {r['verdict']}")
    if bdev != ndev:
        print(f"WARNING: different devices ({bdev} vs {ndev}): the timings are not comparable")
    n = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("ok", "improved", "regressed", "missing", "new")}
    fail = n["regressed"] > 0 or (fail_on_missing and n["missing"] > 0)
    print(f"{len(rows)} case(s): {n['regressed']} regressed (> +{100 * threshold:.0f}%), {n['improved']} improved, "
          f"{n['ok']} within ±{100 * threshold:.0f}%, {n['missing']} missing, {n['new']} new"
          f" -> {'FAIL' if fail else 'PASS'}")
    return 1 if fail else 0
