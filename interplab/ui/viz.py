"""Plotly figures. Every function returns a `plotly.graph_objects.Figure`."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..components import parse, split_slot
from ..figures import register


def _axis(scores, dim: str) -> list[str]:
    n = scores.shape[scores.dims.index(dim)]
    names = scores.labels.get(dim)
    # Position labels carry the index too: the same token can occur twice.
    return [f"{i}: {names[i]}" if names else str(i) for i in range(n)]


def _heatmap(values, x, y, zmax, showscale=True, probability=False):
    # Probabilities run 0..1 on a sequential scale; signed effects on a diverging one centred on 0.
    scale = dict(colorscale="Blues", zmin=0, zmax=1) if probability else \
        dict(colorscale="RdBu", zmid=0, zmin=-zmax, zmax=zmax)
    return go.Heatmap(z=values.tolist(), x=x, y=y, showscale=showscale,
                      hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>", **scale)


def _every_label(labels: list[str]) -> dict:
    """Axis settings that draw every category label: left to itself plotly drops labels that would
    overlap (at JupyterLab width every other position, the final one, where the effect is, included)
    and may read numeric labels ("0", "1") as a number line with fractional ticks."""
    return dict(type="category", tickmode="array", tickvals=labels, ticktext=labels, automargin=True,
                tickfont=dict(size=10 if len(labels) > 12 else 12))


@register("scores")
def scores_figure(scores, title: str | None = None, height: int | None = None) -> go.Figure:
    """Heatmap for 2-D scores (first dim on y), bars for 1-D, small multiples for 3-D (one heatmap per
    index of the first dim, stacked so that each is as wide as the figure and keeps every x label).
    Scores with `meta["scale"] == "probability"` (the logit lens) use a sequential 0..1 colour scale."""
    title = title or scores.meta.get("title") or " × ".join(scores.dims)
    zmax = max(scores.values.abs().max().item(), 1e-9)
    probability = scores.meta.get("scale") == "probability"
    if scores.values.dim() == 1:
        (dim,) = scores.dims
        fig = go.Figure(go.Bar(x=_axis(scores, dim), y=scores.values.tolist()))
        fig.update_layout(xaxis_title=dim, yaxis_title="probability" if probability else "score")
        fig.update_xaxes(**_every_label(_axis(scores, dim)))
    elif scores.values.dim() == 2:
        ydim, xdim = scores.dims
        x, y = _axis(scores, xdim), _axis(scores, ydim)
        fig = go.Figure(_heatmap(scores.values, x, y, zmax, probability=probability))
        fig.update_xaxes(title=xdim, **_every_label(x))
        fig.update_yaxes(title=ydim, autorange="reversed", **_every_label(y))
    elif scores.values.dim() == 3:
        outer, ydim, xdim = scores.dims
        names, x, y = _axis(scores, outer), _axis(scores, xdim), _axis(scores, ydim)
        fig = make_subplots(rows=len(names), cols=1, subplot_titles=[f"{outer} {n}" for n in names],
                            shared_xaxes=True, vertical_spacing=min(0.3 / len(names), 0.08))
        for i in range(len(names)):
            fig.add_trace(_heatmap(scores.values[i], x, y, zmax, i == 0, probability), row=i + 1, col=1)
        fig.update_xaxes(**_every_label(x))  # labels drawn under the bottom facet (shared x)
        fig.update_xaxes(title=xdim, row=len(names), col=1)
        fig.update_yaxes(title=ydim, autorange="reversed", **_every_label(y))
        height = height or 160 + len(names) * (40 + 22 * len(y))
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

    Notebooks stay small (no copy of plotly.js per notebook); `interplab.ui.report`
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
    layer, head = parse(split_slot(node)[0])
    return (2.0 * layer + 2, middle) if head is None else (2.0 * layer + 1, float(head))


@register("circuit")
def circuit_figure(circuit, title: str | None = None, max_edges: int = 200, height: int = 480) -> go.Figure:
    """The circuit's edges between nodes placed by layer; width by |score|, colour by sign (red: the edge
    carries the clean-vs-corrupt effect, score > 0; blue: it works against it), dash by the receiving input (query solid, key dashed, value dotted). At most `max_edges` edges, largest first."""
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
                      color="rgba(178,24,43,0.7)" if score > 0 else "rgba(33,102,172,0.7)")))
    nodes = {"input", "logits"} | {n.split("<")[0] for s, r, _ in edges for n in (s, r)}
    xy = [_node_position(n, graph.n_layers, graph.n_heads) for n in sorted(nodes)]
    fig.add_trace(go.Scatter(x=[p[0] for p in xy], y=[p[1] for p in xy], mode="markers+text", text=sorted(nodes),
                             textposition="top center", marker=dict(size=12, color="#444"), showlegend=False,
                             hoverinfo="text"))
    ticks = [2 * l + 1 for l in range(graph.n_layers)]
    fig.update_layout(
        title=title or f"circuit: {circuit.n_edges} of {graph.n_edges} edges (red: carries the effect)",
        height=height, plot_bgcolor="white", margin=dict(l=40, r=20, t=60, b=40),
        xaxis=dict(tickvals=[0] + ticks + [2 * graph.n_layers + 1],
                   ticktext=["input"] + [f"layer {l}" for l in range(graph.n_layers)] + ["logits"]),
        yaxis=dict(title="head", autorange="reversed", tickmode="array", tickvals=list(range(graph.n_heads))))
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


@register("update_arms")
def update_arms_figure(result, title: str = "localized updates") -> go.Figure:
    """The update experiment (`updates.UpdateResult`): per metric, each run as a dot and each arm's mean with
    its 95% interval."""
    metrics = {"gain": "target gain", "retention": "retention (Δ other tasks)", "kl": "KL from base"}
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics.values()))
    for col, metric in enumerate(metrics, start=1):
        for row in result.rows():
            runs = result.arm(row["arm"])
            mean, low, high = row[metric]
            fig.add_trace(go.Box(y=[getattr(r, metric) for r in runs], name=row["arm"], boxpoints="all",
                                 fillcolor="rgba(0,0,0,0)", line_color="rgba(0,0,0,0)", pointpos=0, jitter=0.4,
                                 marker=dict(size=5, opacity=0.5), showlegend=False, hoverinfo="y"),
                          row=1, col=col)
            error = dict(type="data", symmetric=False, array=[high - mean], arrayminus=[mean - low]) \
                if low == low else None  # no interval for a single run (nan)
            fig.add_trace(go.Scatter(x=[row["arm"]], y=[mean], mode="markers", error_y=error,
                                     marker=dict(size=10, color="black", symbol="diamond"), showlegend=False,
                                     hovertemplate=f"{row['arm']}: mean %{{y:.3f}}<extra></extra>"),
                          row=1, col=col)
    fig.update_layout(title=title, height=380)
    return fig


# ---- free evolution (helper "evolution"): circuits over a checkpoint series ----

def _component_grid(names: list[str], values) -> tuple[list[list[float]], list[str], list[str]]:
    """Component values laid out `[layer, head..., mlp]` for a heatmap: (z, x labels, y labels)."""
    parsed = [parse(n) for n in names]
    layers = sorted({layer for layer, _ in parsed})
    n_heads = sum(1 for layer, head in parsed if layer == layers[0] and head is not None)
    z = [[None] * (n_heads + 1) for _ in layers]
    for (layer, head), v in zip(parsed, values):
        z[layer][n_heads if head is None else head] = float(v)
    return z, [f"h{h}" for h in range(n_heads)] + ["mlp"], [f"layer {layer}" for layer in layers]


def circuit_grids_figure(traj, task: str, t: int, height: int = 360) -> go.Figure:
    """The task's component scores at checkpoint 0 and at checkpoint t, side by side; circuit members
    (top-k by |score|) are ringed."""
    titles = [f"{traj.labels[i]}: circuit {', '.join(traj.circuit(task, i))}" for i in (0, t)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, shared_yaxes=True)
    zmax = max(float(traj.scores[task][[0, t]].abs().max()), 1e-9)
    for col, i in enumerate((0, t), start=1):
        z, x, y = _component_grid(traj.components, traj.scores[task][i].tolist())
        fig.add_trace(go.Heatmap(z=z, x=x, y=y, colorscale="RdBu", zmid=0, zmin=-zmax, zmax=zmax, showscale=col == 1,
                                 hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>"), row=1, col=col)
        members = traj.circuit(task, i)
        cells = [(x[-1] if head is None else f"h{head}", f"layer {layer}") for layer, head in map(parse, members)]
        fig.add_trace(go.Scatter(x=[c[0] for c in cells], y=[c[1] for c in cells], mode="markers", showlegend=False,
                                 marker=dict(symbol="circle-open", size=22, color="black", line=dict(width=2)),
                                 hoverinfo="skip"), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"{task}: component scores, top {traj.k} ringed", height=height,
                      margin=dict(l=60, r=20, t=80, b=40))
    return fig


@register("trajectory_curves")
def trajectory_curves(traj, task: str, marker: int | None = None, height: int = 380) -> go.Figure:
    """Distance (left) and stability (right) of the task's circuit over checkpoints; a dotted line at `marker`."""
    x = list(range(len(traj.labels)))
    fig = make_subplots(rows=1, cols=2, subplot_titles=["circuit distance", "circuit stability"])
    distance = {"to step 0 (Jaccard)": traj.distance(task), "heads only": traj.distance(task, component="head"),
                "MLPs only": traj.distance(task, component="mlp"), "weighted": traj.distance(task, weighted=True),
                "to previous": traj.distance(task, "previous")}
    stability = {"Spearman to step 0": traj.rank_stability(task), "faithfulness of C_0 on θ_t":
                 traj.faithfulness[task][0], "faithfulness of C_t on θ_t": traj.faithfulness[task].diagonal(),
                 "mean CKA to step 0": traj.cka[task].nanmean(1)}
    for col, curves in enumerate((distance, stability), start=1):
        for name, y in curves.items():
            fig.add_trace(go.Scatter(x=x, y=y.tolist(), mode="lines+markers", name=name), row=1, col=col)
    if marker is not None:
        for col in (1, 2):
            fig.add_vline(x=marker, line_dash="dot", line_color="black", row=1, col=col)
    fig.update_xaxes(tickvals=x, ticktext=traj.labels, tickangle=-45)
    fig.update_layout(title=f"{task}: how the top-{traj.k} circuit moves ({traj.meta.get('position', 'all')} "
                            "positions)", height=height, margin=dict(l=60, r=20, t=60, b=80))
    return fig


@register("trajectory_heatmap")
def trajectory_heatmap(traj, task: str, height: int = 520) -> go.Figure:
    """Components × checkpoints heatmap of the task's scores; circuit members marked with a dot."""
    values = traj.scores[task].T  # (n_comp, n_ckpt)
    zmax = max(float(values.abs().max()), 1e-9)
    fig = go.Figure(_heatmap(values, traj.labels, traj.components, zmax))
    cells = [(traj.labels[t], n) for t in range(len(traj.labels)) for n in traj.circuit(task, t)]
    fig.add_trace(go.Scatter(x=[c[0] for c in cells], y=[c[1] for c in cells], mode="markers", showlegend=False,
                             marker=dict(size=6, color="black"), hoverinfo="skip"))
    fig.update_layout(title=f"{task}: component scores over checkpoints (dots: top {traj.k})", height=height,
                      yaxis_autorange="reversed", xaxis_title="checkpoint", yaxis_title="component")
    return fig


@register("trajectory_conflict")
def trajectory_conflict(traj, height: int = 380) -> go.Figure:
    """Per task pair over checkpoints: circuit overlap (left) and the mean gradient cosine over shared
    components (right; below 0, the tasks pull their shared components opposite ways)."""
    x = list(range(len(traj.labels)))
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"|C_A ∩ C_B| (k = {traj.k})",
                                                        "gradient cosine on shared components"])
    for a, b in traj.cosine:
        fig.add_trace(go.Scatter(x=x, y=traj.overlap(a, b).tolist(), mode="lines+markers", name=f"{a} / {b}"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=traj.shared_cosine(a, b).tolist(), mode="lines+markers",
                                 name=f"{a} / {b} cosine"), row=1, col=2)
    fig.add_hline(y=0, line_dash="dot", line_color="grey", row=1, col=2)
    fig.update_xaxes(tickvals=x, ticktext=traj.labels, tickangle=-45)
    fig.update_yaxes(dtick=1, row=1, col=1)  # an overlap is a count of components: whole-number ticks
    fig.update_layout(title="circuit conflict between tasks", height=height, margin=dict(l=60, r=20, t=60, b=80))
    return fig


# ---- parameter decomposition ----

@register("decomposition")
def decomposition_figure(dec, title: str = "Parameter decomposition") -> go.Figure:
    """L0 per module (left) and every loss term on a log scale (right) over a `Decomposition`'s training."""
    if not dec.history["step"]:
        raise RuntimeError("nothing logged yet: call fit(...) first")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("L0 (components with g > 0.1 per token)", "losses"))
    steps = dec.history["step"]
    for key, values in dec.history.items():
        if key == "step":
            continue
        col = 1 if key.startswith("L0/") else 2
        fig.add_trace(go.Scatter(x=steps, y=values, name=key, mode="lines"), row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title, height=420, margin=dict(l=60, r=20, t=60, b=60))
    return fig
