"""Run every notebook headless and export each one as a standalone HTML report.

`python -m interplab.ui.report notebooks reports` (what `make demo` runs) executes
the notebooks in filename order, each in a fresh kernel whose working
directory is the notebooks folder, and writes `reports/<name>.html`.

Reports must open offline and show every output, so a report makes no request
at all: plotly.js is embedded once per report rather than fetched from a CDN,
and the page loads neither require.js, MathJax (TeX in markdown stays as its
source) nor the widget loader. Figures shown with the `plotly_mimetype`
renderer (JupyterLab's default) carry only their JSON, which nbconvert cannot
draw, so each gets an HTML rendering of that JSON before export. Widgets
(progress bars, explorers) would need a live kernel or the widget loader, so
each is replaced by a static snapshot of its final state, read from the widget
state nbclient records: a finished progress bar as its text, an explorer as its
current settings and figure. Cells marked `# NBVAL_SKIP` (they need a model hub)
are skipped here as under nbval.
"""

from __future__ import annotations

import argparse
import html as html_lib
import re
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import plotly.io as pio
from jinja2 import DictLoader
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter
from plotly.offline import get_plotlyjs

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# nbconvert's lab template without the blocks that load scripts from CDNs (require.js, the widget
# loader, MathJax, mermaid.js): nothing in these reports needs them once widgets are snapshots.
OFFLINE_TEMPLATE = "interplab_offline.html.j2"
OFFLINE_TEMPLATE_SOURCE = """{%- extends 'index.html.j2' -%}
{% block html_head_js_requirejs %}{% endblock html_head_js_requirejs %}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_js_mermaidjs %}{% endblock html_head_js_mermaidjs %}
"""
SKIP_MARK = re.compile(r"^\s*#\s*NBVAL_SKIP\b", re.MULTILINE)
SKIP_TAG = "interplab-report-skip"
# The plotly.js bundle opens with this banner: a report holding it has plotly.js embedded.
PLOTLYJS_BANNER = "* plotly.js v"


class NotebookFailed(RuntimeError):
    """A notebook cell raised while building the reports."""


class _Client(NotebookClient):
    """Forgets the state of widgets closed while the notebook ran (a `tqdm(leave=False)` bar), whose views
    JupyterLab removes too; nbclient keeps the last state of every widget it saw."""

    def handle_comm_msg(self, outs, msg, cell_index) -> None:
        super().handle_comm_msg(outs, msg, cell_index)
        if msg["msg_type"] == "comm_close":
            self.widget_state.pop(msg["content"]["comm_id"], None)


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
    client = _Client(
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


def _plotly_html(figure: dict) -> str:
    return pio.to_html(figure, include_plotlyjs=False, full_html=False, default_width="100%", validate=False)


def render_plotly_outputs(nb) -> None:
    """Give every output that holds only plotly JSON an HTML rendering (plotly.js not included)."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME in data and "text/html" not in data:
                data["text/html"] = _plotly_html(data[PLOTLY_MIME])


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _output_html(output: dict) -> str:
    """One output captured by an `Output` widget, as HTML (richest drawable type first)."""
    if output.get("output_type") == "stream":
        return f"<pre>{html_lib.escape(_text(output.get('text', '')))}</pre>"
    if output.get("output_type") == "error":
        traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(output.get("traceback", [])))
        return f"<pre>{html_lib.escape(traceback)}</pre>"
    data = output.get("data", {})
    if PLOTLY_MIME in data:
        return _plotly_html(data[PLOTLY_MIME])
    if "text/html" in data:
        return _text(data["text/html"])
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            return f'<img src="data:{mime};base64,{_text(data[mime]).strip()}">'
    if "image/svg+xml" in data:
        return _text(data["image/svg+xml"])
    return f"<pre>{html_lib.escape(_text(data.get('text/plain', '')))}</pre>"


def _progress_text(value: float, total: float, width: int = 20) -> str:
    filled = round(width * value / total) if total else width
    return "█" * filled + "·" * (width - filled)


def _selected(state: dict) -> str:
    labels, index = state.get("_options_labels", []), state.get("index")
    if isinstance(index, (list, tuple)):  # SelectMultiple
        return ", ".join(labels[i] for i in index)
    return labels[index] if index is not None and index < len(labels) else ""


def _widget_snapshot(states: dict, model_id: str) -> tuple[str, str]:
    """A widget's final state as (html, text): boxes lay out their children, progress bars become a
    bar with their text, `Output` widgets show what they captured, controls show their current value."""
    model = states.get(model_id)
    if model is None:
        return "", ""
    name, state = model["model_name"].removesuffix("Model"), model["state"]
    description = state.get("description", "")
    children = [_widget_snapshot(states, child.removeprefix("IPY_MODEL_")) for child in state.get("children", [])]
    if name in ("HBox", "VBox", "Box", "GridBox"):
        direction, joiner = ("row", " ") if name == "HBox" else ("column", "\n")
        wrap = "flex-wrap:wrap;align-items:center" if name == "HBox" else "align-items:stretch"
        html = (f'<div style="display:flex;flex-direction:{direction};{wrap};gap:0.5em">'
                + "".join(f"<div>{h}</div>" for h, _ in children) + "</div>")
        return html, joiner.join(t for _, t in children if t)
    if name in ("HTML", "HTMLMath"):
        return state.get("value", ""), html_lib.unescape(re.sub(r"<[^>]+>", "", state.get("value", "")))
    if name == "Label":
        return html_lib.escape(state.get("value", "")), state.get("value", "")
    if name in ("FloatProgress", "IntProgress"):
        value, total = float(state.get("value", 0)), float(state.get("max", 100))
        html = f'<progress value="{value}" max="{total}" style="width:20em"></progress>'
        return html, f"|{_progress_text(value, total)}|"
    if name == "Output":
        parts = [_output_html(o) for o in state.get("outputs", [])]
        texts = [_text(o.get("text", o.get("data", {}).get("text/plain", ""))) for o in state.get("outputs", [])]
        return "".join(parts), "\n".join(texts)
    if name == "Checkbox":
        text = f"{'☑' if state.get('value') else '☐'} {description}"
    elif "_options_labels" in state:
        text = f"{description}: {_selected(state)}"
    elif name == "Button":
        text = f"[{description}]"
    else:  # sliders, text boxes, ...
        text = f"{description}: {state.get('value', '')}" if description else str(state.get("value", ""))
    return (f'<span style="display:inline-block;padding:0.2em 0.5em;border:1px solid #ccc;border-radius:3px">'
            f"{html_lib.escape(text)}</span>"), text


def render_widget_outputs(nb) -> None:
    """Replace every widget view by a static snapshot of its final state, and drop the widget state.

    A widget closed before the notebook ended (a `tqdm(leave=False)` bar) is gone from the page in
    JupyterLab too, so its output is dropped.
    """
    states = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                html, text = _widget_snapshot(states, data[WIDGET_VIEW]["model_id"])
                if not html and not text:
                    continue
                output["data"] = {"text/html": f'<div class="interplab-widget-snapshot">{html}</div>',
                                  "text/plain": text}
            kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    nb.metadata.pop("widgets", None)


def to_html(nb) -> str:
    """Export an executed notebook as one offline HTML page: plotly.js embedded exactly once, widgets as
    static snapshots, no script, style sheet or font fetched from the network."""
    render_widget_outputs(nb)
    render_plotly_outputs(nb)
    exporter = HTMLExporter(template_name="lab", template_file=OFFLINE_TEMPLATE,
                            extra_loaders=[DictLoader({OFFLINE_TEMPLATE: OFFLINE_TEMPLATE_SOURCE})])
    html, _ = exporter.from_notebook_node(nb)
    if PLOTLYJS_BANNER not in html:
        # In <head>, so that Plotly exists before any figure's script runs.
        script = f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>'
        html = html.replace("</head>", script, 1)
    return html


# Attributes whose URL the browser fetches while loading the page (not links a reader may click).
LOADING_ATTRIBUTES = {"src", "srcset", "poster", "data", "background", "href", "xlink:href", "imagesrcset"}
CLICKED = {"a", "area", "base", "form"}  # their href is a link, not a load (base only resolves others)
REMOTE = re.compile(r"""^\s*(?:https?:)?//""", re.IGNORECASE)
# URLs inside CSS and JavaScript text: url(...), @import, static `import ... from "..."`/`import "..."`,
# `export ... from`, dynamic import(...) and require([...]).
TEXT_LOAD = re.compile(
    r"""(?:url\(\s*|@import\s+(?:url\(\s*)?|\bimport\s*(?:[\w$*{}\s,]+?\s*from\s*)?|\bimport\(\s*|"""
    r"""\brequire\(\s*\[?\s*|\bexport\s*[\w$*{}\s,]+?\s*from\s*)["']?((?:https?:)?//[^"'\s)>]+)""", re.IGNORECASE)


class _Loads(HTMLParser):
    """Collects every remote URL the page would fetch: from loading attributes, meta refresh, inline
    style attributes, and the text of <style> and <script> elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._text_of: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = [(name.lower(), value or "") for name, value in attrs]
        for name, value in attrs:
            if name in ("srcset", "imagesrcset"):
                self.urls += [part.split()[0] for part in value.split(",") if part.split() and REMOTE.match(part)]
            elif name in LOADING_ATTRIBUTES and not (name == "href" and tag in CLICKED) and REMOTE.match(value):
                self.urls.append(value.strip())
            elif name == "style":
                self.urls += TEXT_LOAD.findall(value)
        if tag == "meta" and dict(attrs).get("http-equiv", "").lower() == "refresh":
            target = re.search(r"url\s*=\s*['\"]?([^'\"\s;]+)", dict(attrs).get("content", ""), re.IGNORECASE)
            if target and REMOTE.match(target.group(1)):
                self.urls.append(target.group(1))
        self._text_of = tag if tag in ("style", "script") else None

    def handle_endtag(self, tag):
        self._text_of = None

    def handle_data(self, data):
        if self._text_of:
            self.urls += TEXT_LOAD.findall(data)


def remote_loads(html: str) -> list[str]:
    """Every URL outside this page that loading `html` would fetch (scripts, style sheets, images, srcset,
    posters, objects, SVG images, fonts, imports, meta refresh), ignoring plotly.js's own bundle; links a
    reader may click (`<a href>`) are not loads. An HTML parser reads every attribute, so no pattern can
    miss one hidden by quoting or attribute order."""
    parser = _Loads()
    parser.feed(html.replace(get_plotlyjs(), ""))
    parser.close()
    return parser.urls


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
    parser = argparse.ArgumentParser(prog="python -m interplab.ui.report", description=__doc__.splitlines()[0])
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
