"""The Pareto plot as one self-contained HTML file: plotly.js is embedded, so it opens offline and loads nothing.

Hovering a point shows the trial: id, label, AUC, bytes, epochs, outcome and every feature's dim.
"""
from __future__ import annotations

from pathlib import Path

from .heuristics import HEURISTICS

_SYMBOLS = ("square", "diamond", "triangle-up", "triangle-down", "cross", "star", "x")


def _hover(r: dict) -> str:
    label = HEURISTICS.get(r["heuristic"], r["heuristic"]) if r["heuristic"] else "searched"
    dims = "<br>".join(f"&nbsp;&nbsp;{k} = {v}" for k, v in r["dims"].items())
    return (f"<b>trial {r['trial_id']}</b> ({label})<br>val AUC {r['best_val_auc']:.4f}<br>"
            f"model bytes {r['model_bytes']:,}<br>{r['outcome'].replace('_', ' ')} after {r['epochs']} epochs"
            f"<br>dims:<br>{dims}")


def front_figure(result):
    """The plotly figure: trials, early-stopped trials, the front as a step line, the baselines, the pick."""
    import plotly.graph_objects as go

    fig = go.Figure()

    def points(records: list[dict], name: str, **marker) -> None:
        if records:
            fig.add_trace(go.Scatter(
                x=[r["model_bytes"] for r in records], y=[r["best_val_auc"] for r in records], mode="markers",
                name=name, marker=marker, text=[_hover(r) for r in records], hovertemplate="%{text}<extra></extra>",
            ))

    finite = [r for r in result.trials if r["best_val_auc"] == r["best_val_auc"]]
    points([r for r in finite if r["outcome"] == "stopped_early"], "stopped early (last seen)", color="#bbbbbb", size=6)
    points([r for r in finite if r["outcome"] == "completed" and not r["heuristic"]], "trials", color="#4c72b0", size=8)
    front = result.front
    fig.add_trace(go.Scatter(
        x=[r["model_bytes"] for r in front], y=[r["best_val_auc"] for r in front], mode="lines",
        line={"shape": "hv", "color": "#dd8452", "width": 2}, name="Pareto front", hoverinfo="skip",
    ))
    symbols = iter(_SYMBOLS)
    for r in finite:
        if r["heuristic"] and r["outcome"] == "completed":
            points([r], HEURISTICS.get(r["heuristic"], r["heuristic"]), symbol=next(symbols, "circle"), size=12,
                   line={"color": "black", "width": 1})
    points([result.recommended], "recommended", size=22, color="rgba(0,0,0,0)", line={"color": "red", "width": 2.5})
    fig.update_layout(
        title=f"{result.name}: validation AUC vs model size (hypervolume {result.hypervolume:.4f})",
        xaxis={"title": "model bytes (fp32, log scale)", "type": "log"}, yaxis={"title": "validation AUC"},
        template="plotly_white", hoverlabel={"align": "left"}, legend={"font": {"size": 10}},
    )
    return fig


def write_front_html(result, path: Path) -> Path:
    from pipelines.recipe import write_atomic

    # include_plotlyjs=True embeds the library (no CDN); no MathJax; no plotly.com logo link, no "send to cloud" server URL.
    html = front_figure(result).to_html(
        include_plotlyjs=True, include_mathjax=False, full_html=True,
        config={"displaylogo": False, "showSendToCloud": False},
    )
    return write_atomic(Path(path), html)
