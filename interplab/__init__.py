"""interplab: locate behaviour in language models, and test whether a location is real.

Layers (ARCHITECTURE.md): core (`model`, `tasks`, `metrics`, `scores`, `checks`, `components`, `stats`),
methods (`patching`, `paths`, `attribution`, `circuits`, `evolution`, `edits`, ...), `experiments/` (drivers
of the seeds' experiments) and `ui/` (figures, widgets, the HTML report).
"""

from . import (
    attribution,
    circuits,
    components,
    decompose,
    edits,
    evolution,
    experiments,
    lens,
    metrics,
    patching,
    paths,
    probes,
    spec_check,
    specs,
    stats,
    tasks,
    toy_models,
    training,
    ui,
    weights,
)
from .model import ArchSpec, Model, load
from .spec_check import check_spec
from .scores import Scores
from .tasks import Task

__all__ = [
    "ArchSpec", "Model", "Scores", "Task", "check_spec", "load",
    "attribution", "circuits", "components", "decompose", "edits", "evolution", "experiments", "lens", "metrics",
    "patching", "paths", "probes", "spec_check", "specs", "stats", "tasks", "toy_models", "training", "ui", "weights",
]
__version__ = "0.1.0"
