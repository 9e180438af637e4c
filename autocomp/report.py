"""``report.html``: one self-contained page a person reads to choose a model from a run.

It holds the trade-off plot (every scored candidate's accuracy against its latency, the Pareto
members marked, the constraints drawn), the table of Pareto members, and per member the setting
that built it and what the methods did layer by layer (channels kept, ranks, precisions, blocks
removed, what was skipped). It is written from the run directory alone (``pareto.json``,
``run.json`` and the trials' ``metrics.json``), needs no network and no script, and is rewritten by
``autocomp report`` at any time, for a run that is finished or not.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from urllib.parse import quote
from typing import Any

from autocomp.compare import load_run_summary
from autocomp.results import RunDir, read_json, reported_latency_ms, write_text

__all__ = ["write_report", "render_report", "trial_points"]

#: Per-layer notes whose values are pairs, and what the two numbers of each pair are.
PAIR_NOTES = {
    "prune_channels": ("channels before", "kept"),
    "lowrank_ranks": ("full rank", "rank kept"),
}


def write_report(run_dir: Path | str, out: Path | None = None) -> Path:
    """Write the report of the run in ``run_dir`` to ``out`` (a file, or a directory to write
    ``report.html`` into; default: the run directory's ``report.html``) and return its path. Raises
    :class:`ConfigError` when the directory holds no run summary (``pareto.json``)."""
    summary = load_run_summary(run_dir, complete=False)  # its links go where the run's files are now
    run = RunDir(Path(run_dir))
    path = Path(out) if out is not None else run.root / "report.html"
    if path.is_dir():
        path = path / "report.html"
    write_text(path, render_report(summary, run.read_manifest_if_any(), trial_points(run), path.parent))
    return path


def trial_points(run: RunDir) -> list[dict[str, Any]]:
    """Every scored candidate of the run (trials and their siblings): trial directory name, metric,
    latency (the search's statistic, as the sampler saw it) and whether it met the constraints.
    Records that cannot be read are left out (a run stopped while writing one)."""
    points = []
    for path in sorted(run.root.glob("trials/*/metrics.json")) + sorted(run.root.glob("trials/*/sibling-*/metrics.json")):
        try:
            record = read_json(path)
            if record.get("status") == "complete":
                points.append({"name": str(path.parent.relative_to(run.root / "trials")),
                               "metric": float(record["metric"]), "latency_ms": float(record["latency_ms"]),
                               "feasible": bool(record.get("feasible"))})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return points


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values spanning [lo, hi]."""
    span = hi - lo or abs(hi) or 1.0
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _plot(summary: dict[str, Any], points: list[dict[str, Any]]) -> str:
    """The trade-off plot as inline SVG: latency (x) against metric (y)."""
    base = summary["baseline"]
    members = summary.get("pareto") or []
    xs = [p["latency_ms"] for p in points] + [base["latency_ms"]] + [m["latency_ms"] for m in members]
    ys = [p["metric"] for p in points] + [base["metric"]] + [m["metric"] for m in members]
    constraints = summary.get("constraints") or {}
    floor = None
    if constraints.get("max_drop") is not None:
        drop = constraints["max_drop"]
        floor = base["metric"] * (1 - drop) if constraints.get("relative_drop") else base["metric"] - drop
    max_latency = constraints.get("max_latency_ms")
    x_lo, x_hi = 0.0, max(xs + ([max_latency] if max_latency is not None else [])) * 1.05
    y_lo, y_hi = min(ys + ([floor] if floor is not None else [])), max(ys)
    pad = (y_hi - y_lo) * 0.08 or 0.01
    y_lo, y_hi = y_lo - pad, y_hi + pad
    width, height, left, right, top, bottom = 760, 420, 70, 20, 20, 50

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="metric against latency of every scored candidate">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="#fff" stroke="#999"/>']
    for x in _ticks(x_lo, x_hi):
        parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>'
                     f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:g}</text>')
    for y in _ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{100 * y:.4g}</text>')
    statistic = _e(summary.get("latency_statistic", "p50"))
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">latency, {statistic}'
                 ' (ms)</text>'
                 f'<text transform="translate(16 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{_e(summary.get("metric_name", "metric"))} (%)</text>')
    if floor is not None and y_lo <= floor <= y_hi:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(floor):.1f}" y2="{sy(floor):.1f}" '
                     'stroke="#c33" stroke-dasharray="5 4"><title>the accuracy budget (--max-drop)</title></line>')
    if max_latency is not None and x_lo <= max_latency <= x_hi:
        parts.append(f'<line x1="{sx(max_latency):.1f}" x2="{sx(max_latency):.1f}" y1="{top}" y2="{height - bottom}" '
                     'stroke="#c33" stroke-dasharray="5 4"><title>--max-latency</title></line>')
    for p in points:
        colour = "#7aa6d6" if p["feasible"] else "#bbb"
        parts.append(f'<circle cx="{sx(p["latency_ms"]):.1f}" cy="{sy(p["metric"]):.1f}" r="3.5" fill="{colour}">'
                     f'<title>{_e(p["name"])}: {_pct(p["metric"])} %, {p["latency_ms"]:.3f} ms'
                     f'{"" if p["feasible"] else " (outside the constraints)"}</title></circle>')
    front = sorted(members, key=lambda m: m["latency_ms"])
    if front:
        steps = " ".join(f'{sx(m["latency_ms"]):.1f},{sy(m["metric"]):.1f}' for m in front)
        parts.append(f'<polyline points="{steps}" fill="none" stroke="#1a4f8b" stroke-width="1.5"/>')
    for m in front:
        parts.append(f'<circle cx="{sx(m["latency_ms"]):.1f}" cy="{sy(m["metric"]):.1f}" r="5.5" fill="#1a4f8b">'
                     f'<title>trial {_e(m["trial"])}: {_pct(m["metric"])} %, {m["latency_ms"]:.3f} ms</title></circle>'
                     f'<text x="{sx(m["latency_ms"]) + 7:.1f}" y="{sy(m["metric"]) - 7:.1f}">{_e(m["trial"])}</text>')
    bx, by = sx(base["latency_ms"]), sy(base["metric"])
    parts.append(f'<rect x="{bx - 5:.1f}" y="{by - 5:.1f}" width="10" height="10" fill="#c33">'
                 f'<title>base model: {_pct(base["metric"])} %, {base["latency_ms"]:.3f} ms</title></rect>'
                 f'<text x="{bx - 8:.1f}" y="{by - 8:.1f}" text-anchor="end">base</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _table(summary: dict[str, Any], page_dir: Path) -> str:
    base = summary["baseline"]
    has_test = base.get("test_metric") is not None
    metric = _e(summary.get("metric_name", "metric"))
    head = ["trial", f"{metric} %", "drop (pts)", *([f"test {metric} %"] if has_test else []),
            f"{_e(summary.get('latency_statistic', 'p50'))} ms", "p50 ms", "speedup", "size KiB", "MACs", "params",
            "ONNX file"]
    rows = [["base", _pct(base["metric"]), "–", *([_pct(base.get("test_metric"))] if has_test else []),
             f"{reported_latency_ms(base):.3f}", f"{reported_latency_ms(base, p50=True):.3f}", "1.00x",
             f"{base['size_bytes'] / 1024:.0f}", _count(base.get("macs")), _count(base.get("params")),
             _file(base.get("artifact"), page_dir)]]
    for m in summary.get("pareto") or []:
        # in points whatever the search bounded (a relative --max-drop records a fraction of the base)
        drop = base["metric"] - m["metric"]
        rows.append([f'<a href="#trial-{_e(m["trial"])}">{_e(m["trial"])}</a>', _pct(m["metric"]), f"{100 * drop:.2f}",
                     *([_pct(m.get("test_metric"))] if has_test else []), f"{reported_latency_ms(m):.3f}",
                     f"{reported_latency_ms(m, p50=True):.3f}", f"{m.get('final_speedup', m['speedup']):.2f}x",
                     f"{m['size_bytes'] / 1024:.0f}", _count(m.get("macs")), _count(m.get("params")),
                     _file(m["artifact"], page_dir)])
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>")


def _file(artifact: str | None, page_dir: Path) -> str:
    """A link to ``artifact`` relative to the directory the page lies in, so that it opens wherever
    the run and its report are moved together."""
    if not artifact:
        return "–"
    shown = Path(os.path.relpath(artifact, page_dir)).as_posix()
    return f'<a href="{_e(quote(shown))}">{_e(shown)}</a>'


def _count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g}"


def _member(m: dict[str, Any]) -> str:
    """One Pareto member's setting and what the methods did, layer by layer."""
    out = [f'<section id="trial-{_e(m["trial"])}"><h3>Trial {_e(m["trial"])}</h3>']
    origin = {k: m[k] for k in ("sibling_of", "added", "ablated", "proposed_from", "same_as") if k in m}
    if origin:
        out.append(f"<p>{_e(json.dumps(origin))}</p>")
    for method, setting in (m.get("spec") or {}).items():
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_value(v))}</td></tr>" for k, v in setting.items())
        out.append(f"<details><summary>{_e(method)}: {len(setting)} setting(s)</summary>"
                   f"<table><tr><th>parameter</th><th>value</th></tr>{rows}</table></details>")
    notes = m.get("notes") or {}
    for key, value in notes.items():
        if key in PAIR_NOTES and isinstance(value, dict):
            first, second = PAIR_NOTES[key]
            rows = []
            for layer, pair in value.items():
                try:
                    a, b = (float(x) for x in pair)
                except (TypeError, ValueError):
                    continue
                share = b / a if a else 0.0
                rows.append(f"<tr><td>{_e(layer)}</td><td>{a:g}</td><td>{b:g}</td><td><span class=bar "
                            f'style="width:{100 * min(share, 1):.0f}px"></span> {100 * share:.0f} %</td></tr>')
            out.append(f"<details open><summary>{_e(key)}: {len(rows)} layer(s)</summary><table><tr><th>layer</th>"
                       f"<th>{first}</th><th>{second}</th><th>kept</th></tr>{''.join(rows)}</table></details>")
    others = {k: v for k, v in notes.items() if not (k in PAIR_NOTES and isinstance(v, dict))}
    if others:
        rows = "".join(f"<tr><td>{_e(k)}</td><td><code>{_e(_value(v))}</code></td></tr>" for k, v in others.items())
        out.append(f"<details><summary>other notes</summary><table>{rows}</table></details>")
    skipped = m.get("skipped") or []
    if skipped:
        rows = "".join("<tr>" + "".join(f"<td>{_e(x)}</td>" for x in entry) + "</tr>" for entry in skipped)
        out.append(f"<details><summary>skipped: {len(skipped)}</summary><table><tr><th>method</th><th>what</th>"
                   f"<th>why</th></tr>{rows}</table></details>")
    out.append("</section>")
    return "\n".join(out)


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


_STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}svg text{font-size:12px;fill:#333}
.bar{display:inline-block;height:9px;background:#1a4f8b}details{margin:.3em 0}code{font-size:12px}"""


def render_report(summary: dict[str, Any], manifest: dict[str, Any], points: list[dict[str, Any]],
                  page_dir: Path) -> str:
    """The report's HTML for a run's summary (``pareto.json``), manifest (``run.json``) and scored
    candidates (:func:`trial_points`), its links relative to ``page_dir``, where it will lie."""
    base = summary["baseline"]
    trials = summary.get("trials") or {}
    constraints = summary.get("constraints") or {}
    target = (summary.get("target") or {}).get("name", "?")
    title = f"autocomp: {summary.get('workload', '?')} on {target}"
    bounds = [f"drop at most {_pct(constraints.get('max_drop'))} "
              f"{'% of the base metric' if constraints.get('relative_drop') else 'points'}"]
    if constraints.get("max_latency_ms") is not None:
        bounds.append(f"latency at most {constraints['max_latency_ms']:g} ms")
    status = summary.get("status", "?")
    facts = [
        f"status <b>{_e(status)}</b>" + ("" if status == "complete" else
                                         " (not re-measured side by side; resume the search to finish it)"),
        f"base model: {_pct(base['metric'])} % {_e(summary.get('metric_name', 'metric'))}, "
        f"{reported_latency_ms(base):.3f} ms ({_e(summary.get('latency_statistic', 'p50'))})",
        f"constraints: {_e(', '.join(bounds))}",
        _e(f"{trials.get('complete', '?')} trials complete, {trials.get('failed', '?')} failed, "
           f"{trials.get('feasible', '?')} feasible" + (f", {trials['siblings']} siblings" if trials.get("siblings")
                                                         else "")),
        f"started {_e(manifest.get('started', '?'))}, autocomp {_e((manifest.get('versions') or {}).get('autocomp', '?'))}",
    ]
    members = summary.get("pareto") or []
    body = [
        f"<h1>{_e(title)}</h1>", "<ul>" + "".join(f"<li>{f}</li>" for f in facts) + "</ul>",
        "<h2>Trade-off</h2>",
        "<p>Every scored candidate at the latency the search saw (blue: within the constraints, grey: outside), "
        "the Pareto set joined by a line, the base model in red; the dashed line is the accuracy budget. The "
        "table gives the side-by-side re-measurement at the end of the search where there is one.</p>",
        _plot(summary, points),
        "<h2>Pareto set</h2>",
        _table(summary, page_dir) if members else "<p>No candidate met the constraints.</p>",
        "<h2>What each member is</h2>",
        *(_member(m) for m in members),
    ]
    failures = summary.get("failures") or []
    if failures:
        body.append("<h2>Failed trials</h2><table><tr><th>trial</th><th>reason</th></tr>"
                    + "".join(f"<tr><td>{_e(f.get('trial'))}</td><td style=text-align:left>{_e(f.get('reason'))}"
                              "</td></tr>" for f in failures) + "</table>")
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
