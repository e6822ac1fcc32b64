"""Results out: the terminal table (rich when importable, else plain text), a progress bar,
JSON and CSV files that say what they were measured on, and matplotlib plots.

The JSON document (``schema`` ``mmkernels.bench/1``)::

    {"schema", "op", "title", "date", "commit", "git_dirty", "device": {...}, "versions": {...},
     "ceilings": {...}, "config": {...}, "metric", "flop_convention", "columns",
     "not_timed": {backend: why}, "left_out": {opt-in backend: what it is},
     "skipped_presets": {preset: why}, "skipped": null | why the
     whole op was skipped, "notes": [...], "cases": [row, ...]}

Each row: ``key`` (``op/preset/case/dtype/mode/backend``: what ``mmkernels bench compare``
matches), the shape (``shape``, ``params``, ``scaled_from``), ``status`` (ok | skipped) and
``reason``, ``ms_p50``/``ms_p20``/``ms_p80``, ``tflops``, ``gbps``, ``pct_of_ceiling``,
``speedup_vs_eager``, ``peak_mem_mib``, ``extra_mem_mib`` (CUDA), ``check``, ``first_call_s``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["COLUMNS", "Progress", "build_doc", "format_markdown", "format_plain", "plot", "print_table",
           "write_csv", "write_json"]

SCHEMA = "mmkernels.bench/1"
COLUMNS = {
    "ms_p50 / ms_p20 / ms_p80": "median and 20/80 % quantiles of one call, milliseconds",
    "tflops": "flops / ms_p50 in 1e12 FLOP/s (flop_convention)",
    "gbps": "bytes / ms_p50 in GB/s (bytes: the minimum traffic, see flop_convention)",
    "pct_of_ceiling": "tflops (attention, qformer) or gbps (pooling) as % of the device's measured ceiling "
                      "(ceilings: large bf16 matmul / large copy; null when the dtypes differ)",
    "speedup_vs_eager": "eager ms_p50 / this ms_p50 for the same case",
    "peak_mem_mib": "torch.cuda.max_memory_allocated during one call (inputs included)",
    "extra_mem_mib": "peak_mem_mib minus what was allocated before the call",
    "check": "first call's output against float64 (a slice: batch 0, for attention heads 0..1): "
             "max abs and relative (Frobenius) error; ok = finite and rel_err within ~3x plain PyTorch's",
    "rotation_sets": "input copies cycled through so operands are never L2-resident (CUDA)",
}
CSV_FIELDS = ["key", "op", "preset", "case", "shape", "scaled_from", "dtype", "mode", "backend", "status",
              "ms_p50", "ms_p20", "ms_p80", "tflops", "gbps", "pct_of_ceiling", "speedup_vs_eager",
              "peak_mem_mib", "check_ok", "check_rel_err", "reason", "device", "torch", "triton", "commit", "date"]


def json_safe(x):
    """JSON has no NaN/Infinity: non-finite floats become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def short_text(text: str, n: int) -> str:
    """One line of at most ``n`` characters (whitespace folded, "..." where cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------
# documents
# --------------------------------------------------------------------------------------
def build_doc(*, op: str, title: str, env_info: dict, commit: str, dirty, ceilings: dict | None,
              config: dict, metric: str, convention: str, rows: list[dict], not_timed: dict,
              skipped_presets: dict, notes: list[str], skipped: str | None = None, date: str,
              left_out: dict | None = None) -> dict:
    return {
        "schema": SCHEMA, "op": op, "title": title, "date": date, "commit": commit, "git_dirty": dirty,
        **env_info, "ceilings": ceilings, "config": config, "metric": metric, "flop_convention": convention,
        "columns": COLUMNS, "not_timed": not_timed, "left_out": left_out or {}, "skipped_presets": skipped_presets,
        "skipped": skipped,
        "notes": notes, "cases": rows,
    }


def write_json(path: str | os.PathLike, doc: dict) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(json_safe(doc), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous version


def write_csv(path: str | os.PathLike, docs: list[dict]) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for doc in docs:
            meta = {"device": doc.get("device", {}).get("name"), "torch": doc.get("versions", {}).get("torch"),
                    "triton": doc.get("versions", {}).get("triton"), "commit": doc.get("commit"),
                    "date": doc.get("date")}
            for r in doc.get("cases", []):
                chk = r.get("check") or {}
                w.writerow({**r, **meta, "check_ok": chk.get("ok"), "check_rel_err": chk.get("rel_err")})


# --------------------------------------------------------------------------------------
# terminal table
# --------------------------------------------------------------------------------------
def _num(x, fmt="{:.3g}") -> str:
    if not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return fmt.format(x)


def _ms(x) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _tput(x) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def table_rows(doc: dict, *, brief: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table; ``brief``: timed cases only, fewer columns."""
    metric = "TFLOP/s" if doc.get("metric") == "tflops" else "GB/s"
    head = ["preset", "case", "shape", "dtype", "mode", "backend", "ms p50", "p20-p80", metric, "% peak",
            "x eager", "MiB", "check"]
    out: list[list[str]] = []
    last = None
    for r in doc.get("cases", []):
        if brief and r.get("status") != "ok":
            continue
        group = (r["preset"], r["case"], r["dtype"], r["mode"])
        first = group != last
        last = group
        lead = [r["preset"], r["case"], r["shape"], r["dtype"], r["mode"]] if first else ["", "", "", "", ""]
        if r.get("status") != "ok":
            out.append(lead + [r["backend"], "skip", short_text(r.get("reason") or "", 90), "", "", "", "", ""])
            continue
        chk = r.get("check") or {}
        ok = chk.get("ok", True)
        check = f"{_num(chk.get('rel_err'), '{:.1e}')}" + ("" if ok else " WRONG")
        tput = r.get("tflops") if doc.get("metric") == "tflops" else r.get("gbps")
        out.append(lead + [r["backend"], _ms(r.get("ms_p50")), f"{_ms(r.get('ms_p20'))}-{_ms(r.get('ms_p80'))}",
                           _tput(tput), _num(r.get("pct_of_ceiling"), "{:.0f}%"),
                           _num(r.get("speedup_vs_eager"), "{:.2f}x"), _num(r.get("peak_mem_mib"), "{:.0f}"),
                           check])
    # columns with nothing in them (MiB on a CPU, % peak without ceilings) are left out
    timed = [r for r in out if r[6] != "skip"]
    drop = {h for i, h in enumerate(head) if i >= 8 and timed and all(r[i] in ("-", "") for r in timed)}
    if brief:  # and p20-p80 and the check
        drop |= {"p20-p80", "check", "MiB"}
    if drop:
        idx = [i for i, h in enumerate(head) if h not in drop]
        head, out = [head[i] for i in idx], [[r[i] if i < len(r) else "" for i in idx] for r in out]
    return head, out


def footer_lines(doc: dict) -> list[str]:
    lines = []
    dev = doc.get("device", {})
    c = doc.get("ceilings") or {}
    if c.get("matmul_tflops"):
        lines.append(f"ceilings ({dev.get('name')}): copy {c['copy_gbps']:.1f} GB/s, "
                     f"{c.get('matmul_dtype')} matmul {_tput(c['matmul_tflops'])} TFLOP/s "
                     f"({'cached' if c.get('cached') else 'measured now'}; mmkernels info --remeasure)")
    elif c.get("error"):
        lines.append(f"ceilings: {c['error']}")
    for p, why in (doc.get("skipped_presets") or {}).items():
        lines.append(f"preset {p}: skipped: {why}")
    for b, why in (doc.get("not_timed") or {}).items():
        lines.append(f"not timed: {b}: {why}")
    if doc.get("left_out"):
        lines.append("not in the default set (name them in --backends): "
                     + "; ".join(f"{b}: {why}" for b, why in doc["left_out"].items()))
    scaled = sorted({(r["shape"], r["scaled_from"]) for r in doc.get("cases", []) if r.get("scaled_from")})
    if scaled:
        lines.append(f"CPU run: {len(scaled)} shape(s) scaled down from the real model sizes "
                     f"(e.g. {scaled[0][1]} -> {scaled[0][0]}; --full-size runs the real ones)")
    lines.extend(doc.get("notes") or [])
    wrong = [r["key"] for r in doc.get("cases", [])
             if r.get("status") == "ok" and not (r.get("check") or {}).get("ok", True)]
    if wrong:
        lines.append(f"WRONG: {len(wrong)} case(s) failed the float64 check: {', '.join(wrong[:8])}")
    n_ok = sum(1 for r in doc.get("cases", []) if r.get("status") == "ok")
    n_skip = sum(1 for r in doc.get("cases", []) if r.get("status") != "ok")
    lines.append(f"{n_ok} case(s) timed, {n_skip} skipped; {dev.get('name')}, torch "
                 f"{doc.get('versions', {}).get('torch')}, commit {str(doc.get('commit'))[:12]}, {doc.get('date')}")
    return lines


def format_markdown(doc: dict, *, brief: bool = False) -> str:
    """A GitHub-markdown table of the timed cases (what the README's results table is made from)."""
    head, rows = table_rows(doc, brief=brief)
    keep = [r for r in rows if r[head.index("ms p50")] != "skip"]
    dev = doc.get("device", {})
    lines = [f"{doc.get('title', doc.get('op'))} — {dev.get('name')}, torch {doc.get('versions', {}).get('torch')}, "
             f"commit {str(doc.get('commit'))[:7]}, {str(doc.get('date'))[:10]}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in keep]
    return "\n".join(lines)


def format_plain(doc: dict, *, brief: bool = False) -> str:
    head, rows = table_rows(doc, brief=brief)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [f"{doc.get('title', doc.get('op'))}"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for r in rows:
        if r[6] == "skip":  # the reason runs on without padding
            lines.append(("  ".join(c.ljust(w) for c, w in zip(r[:7], widths[:7], strict=True)) + "  " + r[7]).rstrip())
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.extend(footer_lines(doc))
    return "\n".join(lines)


def _rich_console(file=None):
    try:
        from rich.console import Console
    except ImportError:
        return None
    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    # not a terminal (a CI log, a pipe): wide enough that the table does not wrap
    return Console(file=file, width=None if tty else 200, soft_wrap=False)


def print_wide(console, table) -> None:
    """Print ``table`` at its natural width: in a narrow terminal the lines wrap (nothing
    hidden) instead of rich squeezing columns to ellipses."""
    from rich.console import Console
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    if need > console.width:
        console = Console(file=console.file, width=need, force_terminal=console.is_terminal,
                          color_system=console.color_system, soft_wrap=False)
    console.print(table)


def print_table(doc: dict, *, plain: bool = False, file=None) -> None:
    file = file or sys.stdout
    if doc.get("skipped"):
        print(f"{doc.get('op')}: skipped: {doc['skipped']}", file=file, flush=True)
        return
    console = None if plain else _rich_console(file)
    if console is None:
        print(format_plain(doc), file=file, flush=True)
        return
    from rich.markup import escape
    from rich.table import Table

    head, rows = table_rows(doc)
    rows = [[escape(c) for c in r] for r in rows]  # keys and reasons hold [brackets]
    console.print(doc.get("title", doc.get("op")), markup=False, highlight=False)
    from rich import box

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    numeric = {"ms p50", "p20-p80", "TFLOP/s", "GB/s", "% peak", "x eager", "MiB"}
    for h in head:
        t.add_column(h, justify="right" if h in numeric else "left", no_wrap=True)
    for r in rows:
        if r[6] == "skip":
            t.add_row(*r[:6], "[yellow]skip[/]", f"[dim]{r[7]}[/]", *r[8:])
        else:
            style = "red" if r[-1].endswith("WRONG") else None
            t.add_row(*r, style=style)
    print_wide(console, t)
    for line in footer_lines(doc):
        console.print(line, highlight=False, markup=False)


# --------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------
class Progress:
    """A rich progress bar on a terminal; elsewhere (CI logs) a line at most every ``every_s``
    seconds, so a long run shows it is alive without flooding the log."""

    def __init__(self, description: str, *, enabled: bool = True, every_s: float = 10.0, file=None):
        self.file = file or sys.stderr
        self.description = description
        self.enabled = enabled
        self.every_s = every_s
        self._bar = self._task = None
        self._last = time.monotonic()

    def __enter__(self):
        if self.enabled and hasattr(self.file, "isatty") and self.file.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress

                self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), TextColumn("{task.fields[case]}"),
                                         console=Console(file=self.file), transient=True)
                self._bar.__enter__()
                self._task = self._bar.add_task(self.description, total=None, case="")
            except ImportError:
                self._bar = None
        return self

    def __call__(self, done: int, total: int, row: dict) -> None:
        if not self.enabled:
            return
        what = f"{row['preset']}/{row['case']} {row['mode']} {row['backend']}"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, case=what)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or done == total and total > 20:
            self._last = now
            state = _ms(row.get("ms_p50")) + " ms" if row.get("status") == "ok" else "skipped"
            print(f"[{done}/{total}] {self.description} {what}: {state}", file=self.file, flush=True)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------
def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'mmkernels[bench]' (or pip install matplotlib)"
    return None


def plot(docs: list[dict], path: str | os.PathLike) -> str:
    """Speedup vs eager and throughput vs sequence length, one line per backend, one row of
    panels per (op, dtype, mode). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for doc in docs:
        groups: dict[tuple, list[dict]] = {}
        for r in doc.get("cases", []):
            if r.get("status") == "ok":
                groups.setdefault((doc["op"], r["dtype"], r["mode"]), []).append(r)
        for key in groups:
            panels.append((doc, key, groups[key]))
    if not panels:
        raise ValueError("nothing to plot: no case was timed")
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.2 * len(panels)), squeeze=False)
    for (doc, (op, dtype, mode), rows), (ax_s, ax_t) in zip(panels, axes, strict=True):
        metric = doc.get("metric", "tflops")
        unit = "TFLOP/s" if metric == "tflops" else "GB/s"
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        for b in backends:
            pts = sorted((r["x"], r.get("speedup_vs_eager"), r.get(metric), r["preset"]) for r in rows
                         if r["backend"] == b)
            xs = [p[0] for p in pts]
            # a sweep (one case per length) is a line; model presets sharing a length are points
            ls = "-" if len(set(xs)) == len(xs) else "none"
            ax_s.plot(xs, [p[1] if p[1] is not None else float("nan") for p in pts], marker="o", ls=ls, label=b)
            ax_t.plot(xs, [p[2] if p[2] is not None else float("nan") for p in pts], marker="o", ls=ls, label=b)
        xs_all = sorted({r["x"] for r in rows})
        for ax in (ax_s, ax_t):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [str(x) for x in xs_all], fontsize=8)
            ax.minorticks_off()
            ax.set_xlabel("sequence length (keys / tokens)")
            ax.grid(True, which="major", alpha=0.3)
        ax_s.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax_s.set_ylabel("speedup vs eager (x)")
        ax_t.set_ylabel(unit)
        c = doc.get("ceilings") or {}
        ceiling = c.get("matmul_tflops") if metric == "tflops" else c.get("copy_gbps")
        if ceiling and (metric == "gbps" or c.get("matmul_dtype") == dtype
                        or {c.get("matmul_dtype"), dtype} <= {"bfloat16", "float16"}):
            ax_t.axhline(ceiling, color="black", lw=0.8, ls=":", label="measured ceiling")
        title = f"{op} {mode} {dtype}"
        ax_s.set_title(f"{title}: speedup vs eager")
        ax_t.set_title(f"{title}: {unit}")
        ax_t.legend(fontsize=8, loc="best")
    d0 = docs[0]
    v = d0.get("versions", {})
    smoke = " (CPU smoke test, not performance results)" if d0.get("device", {}).get("type") == "cpu" else ""
    fig.suptitle(f"mmkernels {v.get('mmkernels', '')} on {d0.get('device', {}).get('name')}{smoke} — "
                 f"torch {v.get('torch')}, commit {str(d0.get('commit'))[:7]}, {str(d0.get('date'))[:10]}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def dumps(doc: dict) -> str:
    buf = io.StringIO()
    json.dump(json_safe(doc), buf, indent=1)
    return buf.getvalue()
