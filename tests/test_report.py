"""The HTML reports: notebooks run headless, figures drawable offline, failures named."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from plotly.offline import get_plotlyjs

from interplab import report

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
        new_code_cell("import interplab as il\nimport interplab.viz\n"
                      "if hasattr(il.viz, 'setup_notebook'):\n    il.viz.setup_notebook()"),
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
