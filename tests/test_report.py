"""The HTML reports: notebooks run headless, figures drawable offline, failures named."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from plotly.offline import get_plotlyjs

import interplab as il
from interplab.ui import report

REPO = Path(__file__).resolve().parents[1]
Y_VALUES = [31.4159, 27.1828, 14.1421]


@pytest.fixture
def kernel_sees_repo(monkeypatch):
    """The kernel is a separate process: let it import this checkout's interplab even if not installed."""
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))


def _write(folder: Path, name: str, cells) -> None:
    nbformat.write(new_notebook(cells=cells), folder / name)


def _figure_traces(html: str) -> list[dict]:
    """The trace list passed to each `Plotly.newPlot(id, traces, ...)` call in the page."""
    decoder = json.JSONDecoder()
    calls = re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html)
    return [decoder.raw_decode(html, call.end())[0] for call in calls]


def _check_report(html: str, x: list[str]) -> None:
    plotlyjs = get_plotlyjs()
    assert plotlyjs[:5000] in html and plotlyjs[-5000:] in html  # embedded, not a CDN link
    assert html.count(report.PLOTLYJS_BANNER) == 1
    traces = [t for call in _figure_traces(html) for t in call]
    assert [(t["type"], t["x"], t["y"]) for t in traces] == [("bar", x, Y_VALUES)]


def _figure_cell(x: list[str]):
    return new_code_cell(f"import plotly.graph_objects as go\ngo.Figure(go.Bar(x={x}, y={Y_VALUES}))")


def test_report_embeds_plotlyjs_and_figure(tmp_path, kernel_sees_repo, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    (notebooks / "data.txt").write_text("written next to the notebook")
    _write(notebooks, "01_setup.ipynb", [
        new_markdown_cell("# A tiny report"),
        new_code_cell("import interplab as il\nimport interplab.ui.viz\n"
                      "if hasattr(il.ui.viz, 'setup_notebook'):\n    il.ui.viz.setup_notebook()"),
        # cwd must be the notebooks folder: relative paths in notebooks resolve there.
        new_code_cell("print(open('data.txt').read())"),
        new_code_cell("# NBVAL_SKIP\nraise RuntimeError('needs the hub')"),
        _figure_cell(["p", "q", "r"]),
    ])
    # Without setup_notebook a kernel shows figures as plotly JSON only, which nbconvert cannot draw.
    _write(notebooks, "00_bare.ipynb", [_figure_cell(["s", "t", "u"])])

    written = report.build(notebooks, tmp_path / "reports")

    assert [p.name for p in written] == ["00_bare.html", "01_setup.html"]  # filename order
    out = capsys.readouterr().out
    assert "00_bare.ipynb" in out and "01_setup.ipynb" in out
    _check_report(written[0].read_text(), ["s", "t", "u"])
    html = written[1].read_text()
    _check_report(html, ["p", "q", "r"])
    assert "written next to the notebook" in html


def test_failing_cell_is_named(tmp_path, kernel_sees_repo):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _write(notebooks, "03_broken.ipynb", [
        new_markdown_cell("text"),
        new_code_cell("x = 1"),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\ny = 2\nraise ValueError('planted failure')"),
        new_code_cell("z = 3"),
    ])
    with pytest.raises(report.NotebookFailed,
                       match=r"03_broken\.ipynb: cell 3 of 4 \(`y = 2`\) failed with ValueError: planted failure"):
        report.build(notebooks, tmp_path / "reports")
    assert not (tmp_path / "reports" / "03_broken.html").exists()


def test_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebooks"):
        report.build(tmp_path, tmp_path / "reports")


WIDGET_CELLS = [
    new_markdown_cell("Some TeX: $p(x)$ and a [link](https://arxiv.org/abs/2304.05969), which is not a load."),
    new_code_cell("import interplab as il\nil.ui.viz.setup_notebook()\nfrom tqdm.auto import tqdm\n"
                  "for _ in tqdm(range(7), desc='finished sweep'):\n    pass\n"
                  "for _ in tqdm(range(3), desc='transient', leave=False):\n    pass"),
    new_code_cell("m = il.load('interplab/tiny-base')\ntask = il.tasks.make('ioi', m, n=4, seed=0)\n"
                  "ex = il.ui.widgets.explorer(m, {'ioi': task})\nex.task.value  # the explorer is displayed below\n"
                  "ex"),
]


def test_widgets_become_static_snapshots_without_remote_loads(tmp_path, kernel_sees_repo):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _write(notebooks, "00_widgets.ipynb", WIDGET_CELLS)
    html = report.build(notebooks, tmp_path / "reports")[0].read_text().replace("\u2007", " ")  # tqdm's spaces

    assert report.remote_loads(html) == []  # no require.js, MathJax, widget loader, mermaid
    assert "widget-view+json" not in html and "widget-state+json" not in html
    assert html.count(report.PLOTLYJS_BANNER) == 1
    # The finished bar as its text and a full bar; the closed (leave=False) one gone, as in JupyterLab.
    assert "finished sweep: 100%" in html and "7/7" in html and '<progress max="7.0"' in html
    assert "transient:" not in html and html.count('class="interplab-widget-snapshot"') == 2  # bar, explorer
    # The explorer: its settings as text, and its current figure drawn with the values of the sweep it shows.
    assert "component: attention heads (output)" in html and "mode: denoising" in html
    m = il.load("interplab/tiny-base")
    want = il.patching.heads(m, il.tasks.make("ioi", m, n=4, seed=0), progress=False).values
    (trace,) = [t for call in _figure_traces(html) for t in call]
    assert trace["type"] == "heatmap"
    torch.testing.assert_close(torch.tensor(trace["z"]), want.float(), atol=1e-5, rtol=0)


def test_remote_load_scan_finds_what_a_browser_would_fetch(tmp_path, kernel_sees_repo):
    planted = ['<script src="https://cdn.example/require.js"></script>', "<link rel='stylesheet' href='http://x/y.css'>",
               '<img src="//cdn.example/a.png">', "<style>@import url(https://fonts.example/f.css);</style>",
               '<script>await import("https://cdn.example/mermaid.mjs")</script>']
    assert [len(report.remote_loads(p)) for p in planted] == [1] * len(planted)
    assert report.remote_loads('<a href="https://arxiv.org">a paper</a> <svg xmlns="http://www.w3.org/2000/svg">') == []
    # nbconvert's stock lab template, on a notebook with widgets, makes exactly the requests reports must not.
    from nbconvert import HTMLExporter

    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    _write(notebooks, "w.ipynb", WIDGET_CELLS[:2])
    stock, _ = HTMLExporter(template_name="lab").from_notebook_node(report.execute(notebooks / "w.ipynb"))
    loads = " ".join(report.remote_loads(stock))
    assert "require" in loads and "mathjax" in loads.lower()
