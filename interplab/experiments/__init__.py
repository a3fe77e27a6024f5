"""Drivers of the seeds' experiments, above the methods they run: the localized-update arms (`updates`),
truthfulness evaluation (`truthfulness`), notebook 05's edit experiment (`edit_controls`; its tables and
command in `edit_tables`, imported on its own so `python -m` runs it cleanly) and the organism card's
measurements (`behaviour`). Nothing outside `experiments/` and `ui/` imports from here.
"""

from . import behaviour, edit_controls, truthfulness, updates

__all__ = ["behaviour", "edit_controls", "truthfulness", "updates"]
