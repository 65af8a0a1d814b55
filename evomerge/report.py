"""Run report: the held-out table, best-so-far fitness vs evaluations, and a heatmap of the best recipe's
per-layer parameters, as one self-contained HTML file (plots embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from .recipe import Recipe, atomic_write_text
from .significance import short


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def recipe_matrix(recipe: Recipe, space) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows (param[source]), columns (layer groups), values, read back through recipe.plan."""
    columns, names = [], []
    for g in space.groups:
        name = space.representative(g)
        if name is not None:
            columns.append(g.name)
            names.append(name)
    rows, values = [], []
    params = [p for p in ("weight", "density", "gamma", "epsilon") if p in space.space.genes]
    for p in params:
        for si, sname in enumerate(space.source_names):
            rows.append(f"{p}[{sname}]")
            values.append([float(recipe.plan(space.layout[n]).source_params[si].get(p, float("nan"))) for n in names])
    return rows, columns, values


def selection_line(report: dict[str, Any]) -> str:
    """Which trial became the run's recipe, with its search and select fitness (and the best on search when the
    select split chose another)."""
    sel = report.get("selection") or {}
    top = {c["trial"]: c for c in sel.get("top", [])}
    if not top:
        best, fitness = report["best_trial"], report["best_search_fitness"]
        return f"the run's recipe: trial #{best}, the best on search ({fitness:.3f}; the tasks have no select split)"
    chosen, first = top[sel["chosen"]], top[sel["best_on_search"]]
    line = (
        f"the run's recipe: trial #{chosen['trial']}, search {chosen['search']:.3f}, select {chosen['select']:.3f}, "
        f"chosen on the select split among the top {len(top)} on search"
    )
    if chosen is not first:
        line += f" (the best on search, trial #{first['trial']}: {first['search']:.3f}, select {first['select']:.3f})"
    return line


STYLE = (
    "body{font-family:sans-serif;max-width:960px;margin:2em auto}td,th{padding:4px 10px;text-align:right}"
    "td:first-child{text-align:left}"
)


def write_html_report(run_dir: Path, report: dict[str, Any], best: Recipe, space) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    rows = report["rows"]
    compared = report.get("significance", {}).values()
    table = (
        "<table><tr><th>model</th>"
        + "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
        + "<th>fitness</th>"
        + "".join(f"<th>Δ vs {html.escape(c['ref'])}</th>" for c in compared)
        + "</tr>"
    )
    for name, row in rows.items():
        style = ' style="font-weight:bold"' if name == "evolved" else ""
        table += (
            f"<tr{style}><td>{html.escape(name)}</td>"
            + "".join(f"<td>{row[t]:.3f}</td>" for t in tasks)
            + f"<td>{row['fitness']:.3f}</td>"
            + "".join(f"<td>{html.escape(short(c['rows'].get(name)))}</td>" for c in compared)
            + "</tr>"
        )
    table += "</table>"
    if compared:
        table += (
            "<p>Δ: the row's fitness minus that of the best source / best simple merge on test, on the same test "
            "items, with a paired bootstrap 95% interval and, for 0/1 tasks, an exact McNemar p-value. An interval "
            "above zero: better beyond the luck of the items drawn.</p>"
        )

    fig, ax = plt.subplots(figsize=(6, 3.2))
    hist = [(n, f) for n, f in report["history"] if f is not None]
    if hist:
        xs = list(range(1, len(hist) + 1))
        best_so_far, b = [], float("-inf")
        for _, f in hist:
            b = max(b, f)
            best_so_far.append(b)
        ax.scatter(xs, [f for _, f in hist], s=8, alpha=0.4, label="trial")
        ax.plot(xs, best_so_far, color="C3", label="best so far")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("search fitness")
    ax.legend(loc="lower right")
    curve = _png(fig)
    plt.close(fig)

    heat = ""
    if best is not None and space is not None:
        r, c, v = recipe_matrix(best, space)
        if r:
            fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(c) + 2), 0.35 * len(r) + 1.2))
            im = ax.imshow(v, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(c)), c, rotation=45, ha="right")
            ax.set_yticks(range(len(r)), r)
            fig.colorbar(im, ax=ax)
            heat = f'<h2>Best recipe, per layer group</h2><img src="data:image/png;base64,{_png(fig)}">'
            plt.close(fig)
    failed = report.get("failed_trials", [])
    failures = ""
    if failed:
        items = "".join(f"<li>trial {f['number']}: {html.escape(str(f['reason']))}</li>" for f in failed[-20:])
        failures = (
            f"<h2>Failed trials ({len(failed)}{', the last 20' if len(failed) > 20 else ''})</h2><ul>{items}</ul>"
        )
    name = html.escape(report["name"])
    summary = (
        f"{report['n_trials']} trials, optimizer {html.escape(str(report['optimizer']))}, seed {report['seed']}; "
        f"{html.escape(selection_line(report))}."
    )
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>evomerge run {name}</title>
<style>{STYLE}</style></head><body>
<h1>evomerge run {name}</h1>
<p>{summary}</p>
<h2>Held-out ({report["split"]} split) scores</h2>{table}
<h2>Search progress</h2><img src="data:image/png;base64,{curve}">
{heat}
{failures}
<h2>Best recipe</h2><pre>{html.escape(best.to_yaml() if best else "")}</pre></body></html>"""
    path = run_dir / "report.html"
    atomic_write_text(path, body)
    return path
