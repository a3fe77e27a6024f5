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
