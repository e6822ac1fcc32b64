"""Results out: the one JSON schema, CSV, the terminal table (100 columns; rich colours it when
importable), markdown, a progress line and matplotlib plots.

The JSON document (``schema`` ``mmkernels.bench/1``), written by ``mmkernels bench <op> --json``
and the only format ``mmkernels bench compare`` / ``show`` / ``--resume`` read::

    {"schema", "op", "title", "date", "commit", "git_dirty", "device": {...}, "versions": {...},
     "interpreter", "ceilings": {...}, "config": {...}, "metric", "flop_convention", "baseline", "columns",
     "not_timed": {backend: why}, "left_out": {opt-in backend: what it is},
     "skipped_presets": {preset: why}, "skipped": null | why the whole op was skipped,
     "running": null | the key of the case in progress, "fatal": null | the CUDA error that
     ended the run, "notes": [...], "cases": [row, ...]}

Each row: ``key`` (``op/preset/case/dtype/mode/backend``), ``shape``, ``params``, ``scaled_from``,
``status`` (ok | skipped | not_run) and ``reason``, and the ``COLUMNS`` below.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

from . import env
from .cases import short_text

__all__ = ["COLUMNS", "SCHEMA", "Progress", "format_markdown", "format_table", "new_doc", "plot", "print_table",
           "read_json", "write_csv", "write_json"]

SCHEMA = "mmkernels.bench/1"
COLUMNS = {
    "ms_p50 / ms_p20 / ms_p80": "median and 20/80 % quantiles of one call, milliseconds",
    "tflops": "flops / ms_p50 in 1e12 FLOP/s (flop_convention)",
    "gbps": "bytes / ms_p50 in GB/s (bytes: the minimum traffic, see flop_convention)",
    "pct_of_ceiling": "tflops (attention, Q-Former) or gbps (pooling) as % of the device's measured ceiling "
                      "(a large matmul / a large copy, at the run's CPU thread count; null when the dtypes differ)",
    "speedup_vs_eager": "eager ms_p50 / this ms_p50 for the same case",
    "peak_mem_mib": "torch.cuda.max_memory_allocated during one call (inputs included); extra_mem_mib: minus "
                    "what was allocated before the call",
    "check": "the first call's output (and the inputs' gradients) against float64 on a slice (batch 0; attention: "
             "heads 0..1): max abs and relative (Frobenius) error; ok = finite and within ~3x plain PyTorch's",
    "rotation_sets": "input copies cycled through so operands are never L2-resident (CUDA)",
}
CSV_FIELDS = ["key", "op", "preset", "case", "shape", "scaled_from", "dtype", "mode", "backend", "status",
              "ms_p50", "ms_p20", "ms_p80", "tflops", "gbps", "pct_of_ceiling", "speedup_vs_eager",
              "peak_mem_mib", "check_ok", "check_rel_err", "reason", "device", "torch", "triton", "commit", "date"]
WIDTH = 100


def new_doc(op: str, title: str, device, *, config: dict | None = None, ceilings: dict | None = None,
            metric: str = "", convention: str = "", baseline: str = "eager") -> dict:
    """A results document with nothing run yet: what it is, and where and when it was measured."""
    commit, dirty = env.git_commit()
    return {"schema": SCHEMA, "op": op, "title": title, "date": env.now_iso(), "commit": commit, "git_dirty": dirty,
            **env.describe(device, nvidia_smi=config is not None), "ceilings": ceilings, "config": config or {},
            "metric": metric, "flop_convention": convention, "baseline": baseline, "columns": COLUMNS,
            "not_timed": {}, "left_out": {}, "skipped_presets": {}, "skipped": None, "running": None, "fatal": None,
            "notes": [], "cases": []}


def json_safe(x):
    """JSON has no NaN/Infinity: non-finite floats become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return [json_safe(v) for v in x] if isinstance(x, (list, tuple)) else x


def write_json(path: str | os.PathLike, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(doc), indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous version


def read_json(path: str | os.PathLike) -> dict:
    """A ``mmkernels bench --json`` file; ValueError for anything else."""
    try:
        doc = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a `mmkernels bench --json` file: not text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a `mmkernels bench --json` file: not JSON ({exc.msg}, line {exc.lineno})"
                         ) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a `mmkernels bench --json` file (schema {SCHEMA})")
    return doc


def write_csv(path: str | os.PathLike, docs: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for doc in docs:
            meta = {"device": doc["device"].get("name"), "torch": doc["versions"].get("torch"),
                    "triton": doc["versions"].get("triton"), "commit": doc.get("commit"), "date": doc.get("date")}
            for r in doc["cases"]:
                chk = r.get("check") or {}
                w.writerow({**r, **meta, "check_ok": chk.get("ok"), "check_rel_err": chk.get("rel_err")})


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------
def _num(x, fmt="{:.3g}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _ms(x) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _tput(x) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


#: a timing whose 80 % quantile is over this many times its 20 % one was taken on a busy machine
NOISY_SPREAD = 3.0


def over_ceiling(r: dict) -> bool:
    """The row reads over 100 % of the device's measured ceiling: the ceiling is stale (measured
    while the machine was busier, or at another thread count), not the kernel faster than the device."""
    pct = r.get("pct_of_ceiling")
    return isinstance(pct, (int, float)) and pct > 100.0


def noisy_baselines(doc: dict) -> set:
    """(preset, case, dtype, mode) of the groups whose baseline (eager) timing spread over more than
    ``NOISY_SPREAD``x between its 20 and 80 % quantiles: their "x eager" ratios are not to be trusted."""
    base = doc.get("baseline") or "eager"
    out = set()
    for r in doc.get("cases", []):
        lo, hi = r.get("ms_p20"), r.get("ms_p80")
        if (r.get("status") == "ok" and r.get("backend") == base and isinstance(lo, (int, float))
                and isinstance(hi, (int, float)) and lo > 0 and hi / lo > NOISY_SPREAD):
            out.add((r["preset"], r["case"], r["dtype"], r["mode"]))
    return out


def _cells(doc: dict, r: dict, noisy: set = frozenset()) -> list[str]:
    """backend, ms p50, p20-p80, throughput, % peak, x eager, MiB, check of a timed row; a "% peak"
    over 100 is marked ``*`` (stale ceiling), an "x eager" against a noisy baseline ``?``."""
    chk = r.get("check") or {}
    tput = {"tflops": r.get("tflops"), "gbps": r.get("gbps")}.get(doc.get("metric"), r.get("tflops") or r.get("gbps"))
    pct = _num(r.get("pct_of_ceiling"), "{:.0f}%") + ("*" if over_ceiling(r) else "")
    speedup = _num(r.get("speedup_vs_eager"), "{:.2f}x")
    if r.get("speedup_vs_eager") is not None and (r["preset"], r["case"], r["dtype"], r["mode"]) in noisy:
        speedup += "?"
    return [r["backend"], _ms(r.get("ms_p50")), f"{_ms(r.get('ms_p20'))}-{_ms(r.get('ms_p80'))}", _tput(tput),
            pct, speedup, _num(r.get("peak_mem_mib"), "{:.0f}"),
            _num(chk.get("rel_err"), "{:.1e}") + ("" if chk.get("ok", 1) else " WRONG")]


def format_table(doc: dict, *, brief: bool = False) -> list[str]:
    """The results table, at most 100 columns: a line per (case, dtype, mode), then a row per
    backend; ``brief``: timed rows only. The footer lines follow."""
    metric = {"tflops": "TFLOP/s", "gbps": "GB/s"}.get(doc.get("metric"), "TF|GB/s")
    head = ["backend", "ms p50", "p20-p80", metric, "% peak", "x eager", "MiB", "check"]
    widths = [14, 8, 15, 8, 6, 8, 6, 13]
    rows = [r for r in doc["cases"] if r.get("status") == "ok" or not brief]
    noisy = noisy_baselines(doc)
    keep = [i for i, h in enumerate(head) if h != "MiB" or any(r.get("peak_mem_mib") is not None for r in rows)]

    def line(cells):
        return "  " + " ".join(cells[i].rjust(widths[i]) if i else cells[i].ljust(widths[i]) for i in keep)

    lines = [short_text(doc.get("title", doc["op"]), WIDTH), line(head)]
    last = None
    for r in rows:
        group = (r["preset"], r["case"], r["dtype"], r["mode"])
        if group != last:
            real = f" (real: {r['scaled_from']})" if r.get("scaled_from") else ""
            lines += textwrap.wrap(f"{r['preset']}/{r['case']} {r['dtype']} {r['mode']}: {r['shape']}{real}", WIDTH,
                                   subsequent_indent="    ")
            last = group
        lines.append(line(_cells(doc, r, noisy)) if r.get("status") == "ok" else
                     short_text(f"  {r['backend']:<15}{r['status'].replace('_', ' ')}: "
                                f"{r.get('reason') or 'no reason recorded'}", WIDTH))
    return lines + [w for line in footer_lines(doc) for w in textwrap.wrap(line, WIDTH, subsequent_indent="    ")]


def footer_lines(doc: dict) -> list[str]:
    lines = []
    dev, c = doc.get("device", {}), doc.get("ceilings") or {}
    if c.get("matmul_tflops"):
        threads = f", {c['threads']} thread(s)" if c.get("threads") else ""
        lines.append(f"ceilings ({dev.get('name')}{threads}): copy {c['copy_gbps']:.1f} GB/s, {c.get('matmul_dtype')} "
                     f"matmul {_tput(c['matmul_tflops'])} TFLOP/s ({'cached' if c.get('cached') else 'measured now'}; "
                     "mmkernels info --remeasure)")
    elif c.get("error"):
        lines.append(f"ceilings: {c['error']}")
    lines += [f"preset {p}: skipped: {why}" for p, why in (doc.get("skipped_presets") or {}).items()]
    lines += [f"not timed: {b}: {why}" for b, why in (doc.get("not_timed") or {}).items()]
    if doc.get("left_out"):
        lines.append("not in the default set (name them in --backends): "
                     + "; ".join(f"{b}: {why}" for b, why in doc["left_out"].items()))
    scaled = sorted({(r["shape"], r["scaled_from"]) for r in doc["cases"] if r.get("scaled_from")})
    if scaled:
        lines.append(f"CPU run: {len(scaled)} shape(s) scaled down from the real model sizes "
                     f"(e.g. {scaled[0][1]} -> {scaled[0][0]}; --full-size runs the real ones)")
    lines += doc.get("notes") or []
    if doc.get("fatal"):
        lines.append(f"FATAL: {doc['fatal']} (rerun with --resume: that case is then skipped)")
    over = [r for r in doc["cases"] if r.get("status") == "ok" and over_ceiling(r)]
    if over:
        worst = max(r["pct_of_ceiling"] for r in over)
        if c.get("cached") is False:  # measured during this run (or re-measured after it): a busy machine
            why = ("the ceiling, measured during this run while the machine was busy, is too low: rerun on a quieter "
                   f"machine (`mmkernels info --remeasure{_threads_flag(c)}` refreshes it)")
        else:
            why = (f"ceiling stale — `mmkernels info --remeasure{_threads_flag(c)}`, then rerun (a ceiling measured "
                   "while the machine was busier is too low)")
        lines.append(f"% peak marked *: {len(over)} case(s) over 100 % of the measured ceiling (up to {worst:.0f} %): "
                     + why)
    noisy = noisy_baselines(doc)
    if noisy:
        lines.append(f"x eager marked ?: the {doc.get('baseline') or 'eager'} baseline of {len(noisy)} case(s) spread "
                     f"over {NOISY_SPREAD:g}x between its 20 and 80 % quantiles (a busy machine): rerun before "
                     "trusting those ratios")
    wrong = [r["key"] for r in doc["cases"] if r.get("status") == "ok" and not (r.get("check") or {}).get("ok", 1)]
    if wrong:
        lines.append(f"WRONG: {len(wrong)} case(s) failed the float64 check: {', '.join(wrong[:8])}")
    n = {s: sum(1 for r in doc["cases"] if r.get("status") == s) for s in ("ok", "skipped", "not_run")}
    presets = len(doc.get("skipped_presets") or {})
    lines.append(f"{n['ok']} case(s) timed, {n['skipped']} case(s) skipped, {n['not_run']} not run"
                 + (f", {presets} preset(s) skipped (no such shape)" if presets else "")
                 + f"; {dev.get('name')}, torch {doc.get('versions', {}).get('torch')}, commit "
                 f"{str(doc.get('commit'))[:12]}, {doc.get('date')}")
    return lines


def _threads_flag(c: dict) -> str:
    return f" --threads {c['threads']}" if c.get("threads") not in (None, 1) else ""


def format_markdown(doc: dict) -> str:
    """A GitHub-markdown table of the timed cases (what the README's results tables are made from)."""
    metric = {"tflops": "TFLOP/s", "gbps": "GB/s"}.get(doc.get("metric"), "TF|GB/s")
    head = ["case", "shape", "dtype", "mode", "backend", "ms p50", "p20-p80", metric, "% peak", "x eager", "MiB",
            "check"]
    dev = doc.get("device", {})
    lines = [f"{doc.get('title', doc['op'])} — {dev.get('name')}, torch {doc.get('versions', {}).get('torch')}, "
             f"commit {str(doc.get('commit'))[:7]}, {str(doc.get('date'))[:10]}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    noisy = noisy_baselines(doc)
    for r in doc["cases"]:
        if r.get("status") == "ok":
            cells = [f"{r['preset']}/{r['case']}", r["shape"], r["dtype"], r["mode"], *_cells(doc, r, noisy)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def print_table(doc: dict, *, plain: bool = False, file=None) -> None:
    """The table on ``file``; on a terminal with rich importable (and not ``plain``), coloured."""
    file = file or sys.stdout
    if doc.get("skipped"):
        print(f"{doc['op']}: skipped: {doc['skipped']}", file=file, flush=True)
        return
    lines = format_table(doc)
    try:
        from rich.console import Console
        from rich.text import Text
    except ImportError:
        plain = True
    if plain or not file.isatty():
        print("\n".join(lines), file=file, flush=True)
        return
    console = Console(file=file, soft_wrap=True, highlight=False)
    for line in lines:
        style = ("red" if "WRONG" in line or line.startswith("FATAL") else "bold" if not line.startswith(" ") else
                 "yellow" if " skipped: " in line or " not run: " in line else None)
        console.print(Text(line, style=style or ""))


class Progress:
    """Progress on stderr: one line rewritten in place on a terminal; elsewhere (CI logs) a line at
    most every ``every_s`` seconds, so a long run shows it is alive without flooding the log."""

    def __init__(self, description: str, *, enabled: bool = True, every_s: float = 10.0):
        self.description, self.enabled, self.every_s = description, enabled, every_s
        self.tty, self._last = sys.stderr.isatty(), time.monotonic()

    def __call__(self, done: int, total: int, row: dict) -> None:
        if self.enabled and (self.tty or time.monotonic() - self._last >= self.every_s or done == total):
            self._last = time.monotonic()
            state = _ms(row.get("ms_p50")) + " ms" if row.get("status") == "ok" else row["status"]
            text = f"[{done}/{total}] {self.description} {row['preset']}/{row['case']} {row['mode']} {row['backend']}: "
            end = "" if self.tty and done < total else "\n"
            print(("\r\033[K" if self.tty else "") + short_text(text + state, WIDTH), end=end, file=sys.stderr,
                  flush=True)


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------
def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'mmkernels[bench]' (scripts/install.sh installs it)"
    return None


def plot(docs: list[dict], path: str | os.PathLike) -> str:
    """Speedup vs eager and throughput vs sequence length, one line per backend, one row of
    panels per (op, dtype, mode, causal, head dim). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, tuple[dict, list[dict]]] = {}
    for doc in docs:
        for r in doc["cases"]:
            if r.get("status") == "ok":
                p = r.get("params") or {}
                key = (doc["op"], r["dtype"], r["mode"], bool(p.get("causal")), p.get("d"))
                panels.setdefault(key, (doc, []))[1].append(r)
    if not panels:
        raise ValueError("nothing to plot: no case was timed")
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.2 * len(panels)), squeeze=False)
    for ((op, dtype, mode, causal, d), (doc, rows)), (ax_s, ax_t) in zip(panels.items(), axes):
        metric = doc.get("metric", "tflops")
        unit = "TFLOP/s" if metric == "tflops" else "GB/s"
        for b in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["x"], r.get("speedup_vs_eager"), r.get(metric), r["preset"], r["case"]) for r in rows
                         if r["backend"] == b)
            xs = [p[0] for p in pts]
            ls = "-" if len(set(xs)) == len(xs) else "none"  # a sweep is a line; presets sharing a length, points
            for ax, j in ((ax_s, 1), (ax_t, 2)):
                ax.plot(xs, [p[j] if p[j] is not None else float("nan") for p in pts], marker="o", ls=ls, label=b)
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
        if ceiling and (metric == "gbps" or {c.get("matmul_dtype"), dtype} <= {"bfloat16", "float16"}
                        or c.get("matmul_dtype") == dtype):
            ax_t.axhline(ceiling, color="black", lw=0.8, ls=":", label="measured ceiling")
        title = f"{op} {mode} {dtype}" + (" causal" if causal else "") + (f" d={d}" if d else "")
        ax_s.set_title(f"{title}: speedup vs eager")
        ax_t.set_title(f"{title}: {unit}")
        ax_t.legend(fontsize=8, loc="best")
    d0 = docs[0]
    smoke = " (CPU smoke test, not performance results)" if d0["device"].get("type") == "cpu" else ""
    fig.suptitle(f"mmkernels {d0['versions'].get('mmkernels', '')} on {d0['device'].get('name')}{smoke} — torch "
                 f"{d0['versions'].get('torch')}, commit {str(d0.get('commit'))[:7]}, {str(d0.get('date'))[:10]}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (4.2 * len(panels))))  # room for the suptitle
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
