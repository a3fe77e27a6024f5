"""Notebooks are committed clean: no widget state, no outputs of cells whose output nbval ignores.

Opened fresh, a stored widget shows as a stuck progress bar or a raw `VBox(children=...)` line and
marks the tab modified; ignored outputs (plots, progress, timings) only bloat the file and go stale.
Checked outputs (`# NBVAL_CHECK_OUTPUT`) stay: nbval compares them.
"""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"


def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_widget_state_or_ignored_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the metadata; pop nb.metadata['widgets']"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        ignored = "NBVAL_IGNORE_OUTPUT" in cell.source or "NBVAL_SKIP" in cell.source
        assert not (ignored and cell.outputs), f"{path.name} cell {i}: outputs of an ignored cell are stored"
        widgets = [o for o in cell.outputs if WIDGET in o.get("data", {})]
        assert not widgets, f"{path.name} cell {i}: a widget view is stored"
    checked = [c for c in nb.cells if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source]
    assert all(c.outputs for c in checked), f"{path.name}: a checked cell has no stored output for nbval to compare"
