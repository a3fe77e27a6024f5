"""Run every notebook headless and export each one as a standalone HTML report.

`python -m interplab.report notebooks reports` (what `make demo` runs) executes
the notebooks in filename order, each in a fresh kernel whose working
directory is the notebooks folder, and writes `reports/<name>.html`.

Reports must open offline, so plotly.js is embedded once per report rather
than fetched from a CDN. Figures shown with the `plotly_mimetype` renderer
(JupyterLab's default) carry only their JSON, which nbconvert cannot draw, so
each gets an HTML rendering of that JSON before export. Cells marked
`# NBVAL_SKIP` (they need a model hub) are skipped here as under nbval.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
import plotly.io as pio
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter
from plotly.offline import get_plotlyjs

PLOTLY_MIME = "application/vnd.plotly.v1+json"
SKIP_MARK = re.compile(r"^\s*#\s*NBVAL_SKIP\b", re.MULTILINE)
SKIP_TAG = "interplab-report-skip"
# The plotly.js bundle opens with this banner: a report holding it has plotly.js embedded.
PLOTLYJS_BANNER = "* plotly.js v"


class NotebookFailed(RuntimeError):
    """A notebook cell raised while building the reports."""


def _mark_skipped(nb) -> None:
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code" and (SKIP_MARK.search(cell.source) or "nbval-skip" in tags):
            cell.metadata.setdefault("tags", []).append(SKIP_TAG)


def _headline(source: str) -> str:
    """A cell's first line that is not an nbval marker, to name the cell in errors."""
    lines = [line for line in source.strip().splitlines() if not line.lstrip().startswith("# NBVAL")]
    return lines[0] if lines else source.strip()


def execute(path: Path, timeout: int = 1800):
    """Execute the notebook at `path` in a fresh kernel (cwd = its folder); returns the executed notebook.

    Raises `NotebookFailed` naming the notebook, the cell (counted from 1, markdown included)
    and its first line.
    """
    nb = nbformat.read(path, as_version=4)
    _mark_skipped(nb)
    current = {}
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        skip_cells_with_tag=SKIP_TAG,
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_start=lambda cell, cell_index: current.update(index=cell_index, source=cell.source),
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        what = f"{error.ename}: {error.evalue}" if isinstance(error, CellExecutionError) else repr(error)
        raise NotebookFailed(
            f"{path.name}: cell {current['index'] + 1} of {len(nb.cells)} (`{_headline(current['source'])}`) "
            f"failed with {what}. Run it in JupyterLab (`make lab`) to debug."
        ) from error
    return nb


def render_plotly_outputs(nb) -> None:
    """Give every output that holds only plotly JSON an HTML rendering (plotly.js not included)."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME in data and "text/html" not in data:
                figure = data[PLOTLY_MIME]
                data["text/html"] = pio.to_html(figure, include_plotlyjs=False, full_html=False,
                                                default_width="100%", validate=False)


def to_html(nb) -> str:
    """Export an executed notebook as one HTML page with plotly.js embedded exactly once."""
    render_plotly_outputs(nb)
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    if PLOTLYJS_BANNER not in html:
        # In <head>, so that Plotly exists before any figure's script runs.
        script = f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>'
        html = html.replace("</head>", script, 1)
    return html


def build(notebook_dir: str | Path, report_dir: str | Path) -> list[Path]:
    """Execute every `*.ipynb` in `notebook_dir` in filename order; write `report_dir/<name>.html`."""
    notebook_dir, report_dir = Path(notebook_dir), Path(report_dir)
    paths = sorted(notebook_dir.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {notebook_dir.resolve()}")
    report_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] running {path.name} ...", flush=True)
        start = time.perf_counter()
        target = report_dir / f"{path.stem}.html"
        target.write_text(to_html(execute(path.resolve())), encoding="utf-8")
        print(f"[{i}/{len(paths)}] wrote {target} ({time.perf_counter() - start:.0f} s)", flush=True)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interplab.report", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="?", default="notebooks", help="folder of .ipynb files")
    parser.add_argument("reports", nargs="?", default="reports", help="folder for the HTML reports")
    args = parser.parse_args(argv)
    try:
        written = build(args.notebooks, args.reports)
    except (NotebookFailed, FileNotFoundError) as error:
        if error.__cause__ is not None:
            print(error.__cause__, file=sys.stderr)  # the cell's traceback, as nbclient formats it
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(written)} reports in {Path(args.reports).resolve()} (open them in a browser; they work offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
