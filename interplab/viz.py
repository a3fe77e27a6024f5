"""Plotly figures. Every function returns a `plotly.graph_objects.Figure`."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _axis(scores, dim: str) -> list[str]:
    n = scores.shape[scores.dims.index(dim)]
    names = scores.labels.get(dim)
    # Position labels carry the index too: the same token can occur twice.
    return [f"{i}: {names[i]}" if names else str(i) for i in range(n)]


def _heatmap(values, x, y, zmax, showscale=True):
    return go.Heatmap(z=values.tolist(), x=x, y=y, colorscale="RdBu", zmid=0, zmin=-zmax, zmax=zmax,
                      showscale=showscale, hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>")


def scores_figure(scores, title: str | None = None, height: int | None = None) -> go.Figure:
    """Heatmap for 2-D scores (first dim on y), bars for 1-D, small multiples for 3-D."""
    title = title or scores.meta.get("title") or " × ".join(scores.dims)
    zmax = max(scores.values.abs().max().item(), 1e-9)
    if scores.values.dim() == 1:
        (dim,) = scores.dims
        fig = go.Figure(go.Bar(x=_axis(scores, dim), y=scores.values.tolist()))
        fig.update_layout(xaxis_title=dim, yaxis_title="score")
    elif scores.values.dim() == 2:
        ydim, xdim = scores.dims
        fig = go.Figure(_heatmap(scores.values, _axis(scores, xdim), _axis(scores, ydim), zmax))
        fig.update_layout(xaxis_title=xdim, yaxis_title=ydim, yaxis_autorange="reversed")
    elif scores.values.dim() == 3:
        outer, ydim, xdim = scores.dims
        names = _axis(scores, outer)
        fig = make_subplots(rows=1, cols=len(names), subplot_titles=[f"{outer} {n}" for n in names],
                            shared_yaxes=True)
        for i in range(len(names)):
            fig.add_trace(_heatmap(scores.values[i], _axis(scores, xdim), _axis(scores, ydim), zmax, i == 0),
                          row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed")
    else:
        raise ValueError(f"cannot plot {scores.values.dim()}-D scores; select or average dims first")
    fig.update_layout(title=title, height=height or 420, margin=dict(l=60, r=20, t=60, b=60))
    return fig


def grouped_bars(scores, x_dim: str, title: str | None = None, yaxis_title: str = "value",
                 height: int | None = None) -> go.Figure:
    """Bars along `x_dim`, one coloured series per combination of the other dims' labels.

    E.g. weight-diff norms `Scores(stage, module, layer)` with `x_dim="layer"`:
    one bar per (stage, module) at each layer, side by side.
    """
    if x_dim not in scores.dims:
        raise ValueError(f"x_dim {x_dim!r} is not one of the scores' dims {scores.dims}")
    from itertools import product

    values = scores.values.movedim(scores.dims.index(x_dim), -1)  # (..., x)
    others = [d for d in scores.dims if d != x_dim]
    fig = go.Figure()
    for idx in product(*(range(n) for n in values.shape[:-1])):
        name = " / ".join(scores.label(d, j) for d, j in zip(others, idx)) or "value"
        fig.add_trace(go.Bar(x=_axis(scores, x_dim), y=values[idx].tolist(), name=name))
    fig.update_layout(title=title or scores.meta.get("title"), barmode="group", xaxis_title=x_dim,
                      yaxis_title=yaxis_title, height=height or 420, margin=dict(l=60, r=20, t=60, b=60))
    return fig


def setup_notebook() -> None:
    """Show plotly figures as plotly JSON, which JupyterLab renders natively.

    Notebooks stay small (no copy of plotly.js per notebook); `interplab.report`
    turns the JSON into HTML and embeds plotly.js once per report, so reports
    open offline.
    """
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype"


# ---- circuits (helper "circuits") ----

def _node_position(node: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    """Where a circuit node sits: x by layer (heads, then the MLP), y by head index."""
    middle = (n_heads - 1) / 2
    if node == "input":
        return 0.0, middle
    if node == "logits":
        return 2.0 * n_layers + 1, middle
    if node.startswith("m"):
        return 2.0 * int(node[1:]) + 2, middle
    layer, head = node[1:].split(".h")
    return 2.0 * int(layer) + 1, float(head.split("<")[0])


def circuit_figure(circuit, title: str | None = None, max_edges: int = 200, height: int = 480) -> go.Figure:
    """The circuit's edges between nodes placed by layer; width by |score|, colour by sign, dash by
    the receiving input (query solid, key dashed, value dotted). At most `max_edges` edges, largest first."""
    graph = circuit.graph
    edges = circuit.edges()[:max_edges]
    largest = max((abs(v) for *_, v in edges), default=1.0) or 1.0
    dash = {"q": "solid", "k": "dash", "v": "dot"}
    fig = go.Figure()
    for sender, receiver, score in reversed(edges):
        (x0, y0), (x1, y1) = (_node_position(n, graph.n_layers, graph.n_heads) for n in (sender, receiver))
        slot = receiver[-2] if receiver.endswith(">") else "q"
        fig.add_trace(go.Scatter(
            x=[x0, x1], y=[y0, y1], mode="lines", showlegend=False, hoverinfo="text",
            text=f"{sender} → {receiver}: {score:+.3g}",
            line=dict(width=0.5 + 6 * abs(score) / largest, dash=dash[slot],
                      color="rgba(178,24,43,0.7)" if score < 0 else "rgba(33,102,172,0.7)")))
    nodes = {"input", "logits"} | {n.split("<")[0] for s, r, _ in edges for n in (s, r)}
    xy = [_node_position(n, graph.n_layers, graph.n_heads) for n in sorted(nodes)]
    fig.add_trace(go.Scatter(x=[p[0] for p in xy], y=[p[1] for p in xy], mode="markers+text", text=sorted(nodes),
                             textposition="top center", marker=dict(size=12, color="#444"), showlegend=False,
                             hoverinfo="text"))
    ticks = [2 * l + 1 for l in range(graph.n_layers)]
    fig.update_layout(
        title=title or f"circuit: {circuit.n_edges} of {graph.n_edges} edges (red: corrupting hurts)",
        height=height, plot_bgcolor="white", margin=dict(l=40, r=20, t=60, b=40),
        xaxis=dict(tickvals=[0] + ticks + [2 * graph.n_layers + 1],
                   ticktext=["input"] + [f"layer {l}" for l in range(graph.n_layers)] + ["logits"]),
        yaxis=dict(title="head", autorange="reversed"))
    return fig


def faithfulness_curve_figure(curves, title: str = "faithfulness vs number of edges", log_x: bool = False) -> go.Figure:
    """One line per curve (a `Scores` from `circuits.faithfulness_curve`, or a dict name -> Scores).
    With `log_x` the empty circuit (n = 0) is off the axis."""
    curves = curves if isinstance(curves, dict) else {curves.meta.get("method", "circuit"): curves}
    fig = go.Figure()
    for name, curve in curves.items():
        fig.add_trace(go.Scatter(x=curve.meta["n_edges"], y=curve.values.tolist(), mode="lines+markers", name=name))
    fig.add_hline(y=1, line_dash="dot", line_color="grey")
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, xaxis_title="edges in circuit", xaxis_type="log" if log_x else "linear",
                      yaxis_title="faithfulness", height=420)
    return fig


def edge_scores_scatter(reference, estimates: dict, title: str | None = None) -> go.Figure:
    """Estimated edge scores (dict name -> Circuit) against reference scores, on the reference's edges."""
    mask = reference.mask
    x = reference.scores[mask]
    fig = go.Figure()
    for name, circuit in estimates.items():
        fig.add_trace(go.Scatter(x=x.tolist(), y=circuit.scores[mask].tolist(), mode="markers", name=name, opacity=0.7))
    low, high = float(x.min()), float(x.max())
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="y = x",
                             line=dict(color="grey", dash="dot")))
    fig.update_layout(title=title or "edge scores against exact edge patching",
                      xaxis_title=reference.meta.get("method", "reference"), yaxis_title="estimate", height=460)
    return fig
