"""Reports from benchmark rows (JSONL) or from a plan JSON alone: pandas tables and matplotlib figures.

    memplan report rows.jsonl -o report.html         # tables + PNGs embedded as base64
    memplan report rows.jsonl -o report.md --md      # markdown, PNGs written beside it
    memplan report plan.json -o plan.html            # a plan alone: its table, predictions and Pareto front

Figures: (a) the Pareto front card peak x seconds per pipeline with the chosen plans marked, (b) predicted vs
measured (allocator peak, seconds) with the y = x line, (c) the memory timeline of one call over its phases
(predicted per-phase allocator peaks as steps, each phase as wide as its predicted seconds; measured
per-component-call peaks where recorded, i.e. on CUDA).

Accounting rules: sizes in binary units (MiB/GiB), as the CLI prints them. "pred for" is the GPU spec the plan
was priced for, "measured on" the device the row ran on (torch's exact name). Seconds are compared (err time,
measured points on time axes) only when the two are the same card (runner.same_device): seconds measured on a
CPU say nothing about a GPU prediction. "meas s" is the measured call (steps_measured denoising steps); "extrap s"
is that call extrapolated to the plan's full step count, and is what the error compares. Allocator quantities
(max_memory_allocated) and card quantities (what the card must hold: reserved + CUDA context, the budget) are
never drawn on one axis.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or the GPU machine
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

logger = logging.getLogger(__name__)

PHASE_ORDER = ("encode", "denoise", "decode")


# ---------------------------------------------------------------- input

def load_rows(path: str | Path) -> list[dict]:
    """Rows from a benchmark JSONL file, or one "planned" row from a plan JSON (`memplan plan -o`)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "choice" in data and "schema_version" in data:
        return [plan_row(path)]
    if isinstance(data, dict):
        return [data]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def plan_row(path: str | Path) -> dict:
    from benchmarks.runner import plan_fields
    from planner.plan import Plan

    plan = Plan.load(path)
    return {"scenario": Path(path).stem, "pipeline": plan.pipeline_class, "plan_kind": "optimize",
            "device": plan.device, "gpu": plan.hardware.get("name", ""), "status": "planned", "message": "",
            "budget_bytes": plan.budgets.get("vram_bytes"), "components": plan.components, **plan_fields(plan),
            "budget_met_pred": (plan.predicted.card_peak_bytes <= plan.budgets["vram_bytes"])
            if plan.predicted and plan.budgets.get("vram_bytes") else None}


# ---------------------------------------------------------------- tables

def _unit(values) -> tuple[float, str]:
    """A binary unit for the largest value (GiB, MiB or KiB), as planner.units.format_size prints sizes."""
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    big = max(vals, default=0)
    return (2**30, "GiB") if big >= 2**30 else (2**20, "MiB") if big >= 2**20 else (2**10, "KiB")


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """One line per row: predicted (for which GPU) beside measured (where), error % (positive: over-predicted),
    budget met."""
    df = pd.DataFrame(rows)
    div, unit = _unit(list(df.get("budget_bytes", [])) + list(df.get("pred_card_peak_bytes", [])))

    def col(name):
        return df[name] if name in df else pd.Series([None] * len(df), dtype=object)

    def num(name, scale=1.0):
        return pd.to_numeric(col(name), errors="coerce") / scale

    out = pd.DataFrame({
        "scenario": col("scenario"), "plan": col("plan_kind"), "status": col("status"),
        "pred for": col("pred_for").fillna(col("gpu")) if "pred_for" in df else col("gpu"),
        "measured on": col("measured_on"),
        f"budget {unit}": num("budget_bytes", div),
        f"pred card {unit}": num("pred_card_peak_bytes", div), f"meas card {unit}": num("meas_card_peak_bytes", div),
        "err card %": num("err_card_pct"),
        f"pred alloc {unit}": num("pred_allocated_peak_bytes", div),
        f"meas alloc {unit}": num("meas_allocated_peak_bytes", div), "err peak %": num("err_peak_pct"),
        "pred s": num("pred_total_s"), "meas s (measured steps)": num("meas_total_s"),
        "steps measured / full": [f"{m}/{f}" if m else None for m, f in zip(col("steps_measured"), col("steps_full"))],
        "extrap s (full steps)": num("extrap_total_s"), "err time %": num("err_time_pct"),
        "err card % (table spec)": num("err_cmp_card_pct"), "err time % (table spec)": num("err_cmp_time_pct"),
        "budget met (pred)": col("budget_met_pred"), "budget met": col("budget_met"),
    })
    return out.dropna(axis=1, how="all")


def phase_table(rows: list[dict]) -> pd.DataFrame:
    """Per row and phase: predicted and measured allocator peak (MiB) and seconds (measured: the measured steps)."""
    lines = []
    for r in rows:
        for phase in PHASE_ORDER:
            pp, mp = (r.get("pred_phase_peak_bytes") or {}), (r.get("meas_phase_peak_bytes") or {})
            ps, ms = (r.get("pred_phase_s") or {}), (r.get("meas_phase_s") or {})
            if phase in pp or phase in ms:
                lines.append({"scenario": r.get("scenario"), "phase": phase, "pred alloc MiB": _mib(pp.get(phase)),
                              "meas alloc MiB": _mib(mp.get(phase)), "pred s": ps.get(phase),
                              "meas s": ms.get(phase), "extrap s": (r.get("extrap_phase_s") or {}).get(phase)})
    return pd.DataFrame(lines).dropna(axis=1, how="all")


def plan_table(rows: list[dict]) -> pd.DataFrame:
    """Scenario → the plan it ran (component strategies)."""
    return pd.DataFrame([{"scenario": r.get("scenario"), "pipeline": r.get("pipeline"), "plan": r.get("plan_desc", "")}
                         for r in rows])


def alternatives_table(row: dict) -> pd.DataFrame:
    div, unit = _unit([a["card_peak_bytes"] for a in row.get("alternatives", [])])
    return pd.DataFrame([{f"card {unit}": a["card_peak_bytes"] / div, f"host {unit}": a["host_ram_bytes"] / div,
                          "pred s": a["total_s"], "plan": a["desc"]} for a in row.get("alternatives", [])])


def failures_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"scenario": r.get("scenario"), "status": r.get("status"), "message": r.get("message")}
                         for r in rows if r.get("status") not in ("ok", "planned")])


def _mib(n):
    return None if n is None else n / 2**20


# ---------------------------------------------------------------- figures

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _by_pipeline(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("pred_card_peak_bytes") is not None:
            out.setdefault(r.get("pipeline", "?"), []).append(r)
    return out


def pareto_figure(rows: list[dict]) -> bytes | None:
    """(a) Predicted card peak x seconds: the Pareto alternatives (dots), chosen plans (stars), references
    (triangles), measured points (hollow, where recorded) and budgets (dashed)."""
    groups = _by_pipeline(rows)
    if not groups:
        return None
    cols = min(2, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(7 * cols, 4.8 * rows_n), squeeze=False)
    for ax, (pipeline, group) in zip(axes.flat, groups.items()):
        _pareto_axes(ax, Path(pipeline).name, group)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_axis_off()
    fig.tight_layout()
    return _png(fig)


def _pareto_axes(ax, pipeline: str, group: list[dict]) -> None:
    alts = [a for r in group for a in r.get("alternatives") or []]
    div, unit = _unit([a["card_peak_bytes"] for a in alts] + [r["pred_card_peak_bytes"] for r in group])
    if alts:
        hdiv, hunit = _unit([a["host_ram_bytes"] for a in alts])
        dots = ax.scatter([a["card_peak_bytes"] / div for a in alts], [a["total_s"] for a in alts], s=16,
                          c=[a["host_ram_bytes"] / hdiv for a in alts], cmap="viridis", alpha=0.8,
                          label="Pareto alternatives (predicted)", zorder=2)
        ax.figure.colorbar(dots, ax=ax, pad=0.01).set_label(f"host RAM ({hunit})", fontsize=8)
    for r in group:
        chosen = r.get("plan_kind") == "optimize"
        x, y = r["pred_card_peak_bytes"] / div, r["pred_total_s"]
        ax.scatter([x], [y], marker="*" if chosen else "^", s=180 if chosen else 70,
                   c="tab:red" if chosen else "tab:blue", edgecolors="k", zorder=4)
        label = r.get("scenario", "") if chosen else r.get("plan_kind", "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
        if r.get("budget_bytes") and chosen:
            ax.axvline(r["budget_bytes"] / div, ls="--", lw=0.8, c="tab:red", alpha=0.5)
        if r.get("meas_card_peak_bytes") is not None and r.get("time_compared"):  # measured on that very card
            mx, my = r["meas_card_peak_bytes"] / div, r["extrap_total_s"]
            ax.scatter([mx], [my], facecolors="none", edgecolors="tab:green", s=60, zorder=3)
            ax.plot([x, mx], [y, my], c="tab:green", lw=0.6, alpha=0.6)
    ax.scatter([], [], marker="*", c="tab:red", s=120, edgecolors="k", label="chosen (optimize)")
    ax.scatter([], [], marker="^", c="tab:blue", edgecolors="k", label="reference strategy")
    ax.scatter([], [], facecolors="none", edgecolors="tab:green", label="measured")
    ax.plot([], [], ls="--", c="tab:red", lw=0.8, label="budget")
    _log_if_wide(ax, [a["total_s"] for a in alts] + [r["pred_total_s"] for r in group], "y")
    gpus = sorted({str(r.get("pred_for") or r.get("gpu")) for r in group})
    ax.set(xlabel=f"card peak ({unit})", ylabel="seconds per call (measured: on that card only)",
           title=f"{pipeline}: VRAM x latency, predicted for {', '.join(gpus)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)


def _log_if_wide(ax, values, axis: str) -> None:
    pos = [v for v in values if v and v > 0]
    if pos and max(pos) / min(pos) > 100:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def scatter_figure(rows: list[dict]) -> bytes | None:
    """(b) Predicted vs measured: allocator peak (CUDA rows) and seconds per call, with y = x."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.6))
    mem = [r for r in ok if r.get("meas_allocated_peak_bytes") is not None]
    if mem:
        div, unit = _unit([r["meas_allocated_peak_bytes"] for r in mem] + [r["pred_allocated_peak_bytes"] for r in mem])
        _xy(ax_mem, mem, lambda r: r["pred_allocated_peak_bytes"] / div, lambda r: r["meas_allocated_peak_bytes"] / div)
        ax_mem.set(xlabel=f"predicted allocator peak ({unit})", ylabel=f"measured max_memory_allocated ({unit})")
    else:
        ax_mem.text(0.5, 0.5, "no VRAM measured\n(CPU rows: run the GPU check)", ha="center", va="center",
                    transform=ax_mem.transAxes)
        ax_mem.set_xticks([])
        ax_mem.set_yticks([])
    ax_mem.set_title("peak VRAM: predicted vs measured")
    timed = [r for r in ok if r.get("time_compared") and r.get("extrap_total_s") and r.get("pred_total_s")]
    if timed:
        _xy(ax_time, timed, lambda r: r["pred_total_s"], lambda r: r["extrap_total_s"], log=True)
        devices = sorted({str(r.get("measured_on")) for r in timed})
        ax_time.set(xlabel="predicted seconds per call", ylabel="measured s (extrapolated to full steps)")
        ax_time.set_title(f"time on {', '.join(devices)} (same card only)", fontsize=10)
    else:
        where = sorted({str(r.get("measured_on") or r.get("device")) for r in ok})
        gpus = sorted({str(r.get("pred_for") or r.get("gpu")) for r in ok})
        ax_time.text(0.5, 0.5, f"no time compared: predicted for {', '.join(gpus)},\nmeasured on {', '.join(where)}",
                     ha="center", va="center", transform=ax_time.transAxes, fontsize=9)
        ax_time.set_xticks([])
        ax_time.set_yticks([])
        ax_time.set_title("time: predicted vs measured (same card only)")
    return _png(fig)


def _xy(ax, rows, fx, fy, log: bool = False) -> None:
    colors = {p: f"C{i}" for i, p in enumerate(sorted({r.get("pipeline", "?") for r in rows}))}
    xs, ys = [fx(r) for r in rows], [fy(r) for r in rows]
    for r, x, y in zip(rows, xs, ys):
        ax.scatter([x], [y], c=colors[r.get("pipeline", "?")], edgecolors="k", zorder=3)
        ax.annotate(r.get("scenario", ""), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
    lo, hi = min(xs + ys), max(xs + ys)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        lo = min(v for v in xs + ys if v > 0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    for p, c in colors.items():
        ax.scatter([], [], c=c, edgecolors="k", label=p)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def timeline_row(rows: list[dict]) -> dict | None:
    """The call to draw: an ok row with measured per-phase peaks, else the first optimized plan."""
    with_peaks = [r for r in rows if r.get("status") == "ok" and r.get("meas_phase_peak_bytes")]
    planned = [r for r in rows if r.get("pred_phase_peak_bytes") and r.get("plan_kind") == "optimize"]
    any_pred = [r for r in rows if r.get("pred_phase_peak_bytes")]
    return (with_peaks or planned or any_pred or [None])[0]


def timeline_figure(rows: list[dict]) -> bytes | None:
    """(c) One call's allocator bytes over its phases, each phase as wide as its predicted seconds: predicted
    phase peaks as steps, measured component-call peaks (CUDA) placed by their time within the phase. Only
    allocator quantities: the budget is a card quantity (allocator x overhead + context) and is not drawn here."""
    row = timeline_row(rows)
    if row is None:
        return None
    pred, ps = row["pred_phase_peak_bytes"], row.get("pred_phase_s") or {}
    phases = [p for p in PHASE_ORDER if p in pred] + [p for p in pred if p not in PHASE_ORDER]
    edges = [0.0]
    for p in phases:
        edges.append(edges[-1] + ps.get(p, 0.0))
    measured = [e for e in row.get("meas_timeline") or [] if e[4] is not None]
    div, unit = _unit(list(pred.values()) + [e[4] for e in measured])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.stairs([pred[p] / div for p in phases], edges, color="tab:red", lw=2, label="predicted phase peak")
    if measured:
        _measured_steps(ax, measured, phases, edges, div)
    ms = row.get("meas_phase_s") or {}
    for i, p in enumerate(phases):
        same_card = row.get("time_compared") and p in ms  # measured seconds only beside the card's own prediction
        text = f"{p}\npred {ps.get(p, 0):.3g}s" + (f"\nmeas {ms[p]:.3g}s" if same_card else "")
        ax.annotate(text, ((edges[i] + edges[i + 1]) / 2, 0), xytext=(0, -14), textcoords="offset points",
                    ha="center", va="top", fontsize=7, annotation_clip=False)
        ax.axvline(edges[i + 1], c="0.7", lw=0.6)
    note = "" if measured else " (predicted only)" if row.get("status") == "planned" else " (no VRAM measured: CPU run)"
    gpu = row.get("pred_for") or row.get("gpu")
    ax.set(xlabel=f"predicted seconds into the call ({gpu})", ylabel=f"allocator bytes ({unit})",
           title=f"{row.get('scenario')}: allocator memory over one call{note}")
    ax.xaxis.set_label_coords(0.5, -0.2)
    ax.set_xlim(0, edges[-1] or 1.0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def _measured_steps(ax, events, phases, edges, div) -> None:
    """Each component call as a horizontal segment at its allocator peak, placed by its measured time within the
    phase and scaled to the phase's predicted width."""
    spans = {}
    for _, phase, start, end, _ in events:
        lo, hi = spans.get(phase, (start, end))
        spans[phase] = (min(lo, start), max(hi, end))
    label = "measured peak per component call"
    for name, phase, start, end, peak in events:
        if phase not in phases:
            continue
        lo, hi = spans[phase]
        i = phases.index(phase)
        x_lo, width = edges[i], edges[i + 1] - edges[i]
        x0 = x_lo + width * (start - lo) / ((hi - lo) or 1.0)
        x1 = max(x_lo + width * (end - lo) / ((hi - lo) or 1.0), x0 + width * 0.01)
        ax.hlines(peak / div, x0, x1, colors="tab:green", lw=2.5, label=label)
        label = None


FIGURES = (("Pareto front: VRAM x latency", pareto_figure), ("Predicted vs measured", scatter_figure),
           ("Memory timeline of one call", timeline_figure))


def figures(rows: list[dict]) -> list[tuple[str, bytes]]:
    out = []
    for title, make in FIGURES:
        try:
            png = make(rows)
        except Exception as err:  # a broken figure must not lose the tables
            logger.warning("figure %r failed: %s", title, err)
            png = None
        if png:
            out.append((title, png))
    return out


# ---------------------------------------------------------------- rendering

def tables(rows: list[dict]) -> list[tuple[str, pd.DataFrame]]:
    out = [("Summary (error % = 100 * (predicted - measured) / measured; time errors only where predicted for the "
            "card measured on; sizes in binary units)", summary_table(rows)),
           ("Plans", plan_table(rows)), ("Phases", phase_table(rows))]
    planned = [r for r in rows if r.get("status") == "planned"]
    if planned:
        out.append((f"Alternatives of {planned[0]['scenario']} (Pareto front)", alternatives_table(planned[0])))
    fails = failures_table(rows)
    if not fails.empty:
        out.append(("Failures", fails))
    return [(t, df) for t, df in out if not df.empty]


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
        "td:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}")


def render_html(rows: list[dict], title: str, env: dict | None = None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{len(rows)} rows; generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.</p>"]
    if env:
        parts.append("<h2>Environment</h2><pre>" + html.escape(json.dumps(env, indent=2)) + "</pre>")
    for name, df in tables(rows):
        parts.append(f"<h2>{html.escape(name)}</h2>" + df.to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                                  na_rep="", classes="rows"))
    for name, png in figures(rows):
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    return "\n".join(parts + ["</body></html>"])


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in rec) + " |" for rec in df.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(rows: list[dict], title: str, out: Path) -> str:
    """Markdown with the PNGs written beside `out` as <stem>-<n>.png."""
    parts = [f"# {title}", "", f"{len(rows)} rows."]
    for name, df in tables(rows):
        parts += ["", f"## {name}", "", markdown_table(df)]
    for i, (name, png) in enumerate(figures(rows), 1):
        path = out.with_name(f"{out.stem}-{i}.png")
        path.write_bytes(png)
        parts += ["", f"## {name}", "", f"![{name}]({path.name})"]
    return "\n".join(parts) + "\n"


def write_report(source: str | Path, out: str | Path, markdown: bool = False) -> Path:
    """Render `source` (rows JSONL or a plan JSON) to `out` (HTML, or markdown with `markdown=True`)."""
    rows, out = load_rows(source), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env_file = Path(source).with_name("env.json")
    env = json.loads(env_file.read_text()) if env_file.is_file() else None
    title = f"memplan report: {Path(source).name}"
    if markdown:
        out = out.with_suffix(".md")
        out.write_text(render_markdown(rows, title, out))
    else:
        out.write_text(render_html(rows, title, env))
    return out
