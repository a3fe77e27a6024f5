"""The user interface, the top layer: plotly figures (`viz`, which registers the drawers of
`interplab.figures`), ipywidgets explorers (`widgets`) and the offline HTML report (`report`, loaded on
demand: `python -m interplab.ui.report`). Nothing outside `ui/` imports from here.
"""

from . import viz, widgets

__all__ = ["viz", "widgets"]
