"""interplab: locate behaviour in language models, and test whether a location is real."""

from . import (
    attribution,
    circuits,
    decompose,
    edit_experiments,
    edits,
    evolution,
    lens,
    metrics,
    patching,
    paths,
    probes,
    tasks,
    toy_models,
    training,
    truthfulness,
    updates,
    viz,
    weights,
    widgets,
)
from .model import ArchSpec, Model, load
from .scores import Scores
from .tasks import Task

__all__ = [
    "ArchSpec", "Model", "Scores", "Task", "load",
    "attribution", "circuits", "decompose", "edit_experiments", "edits", "evolution", "lens", "metrics", "patching", "paths", "probes",
    "tasks", "toy_models", "training", "truthfulness", "updates", "viz", "weights", "widgets",
]
__version__ = "0.1.0"
