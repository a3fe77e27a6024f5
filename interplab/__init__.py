"""interplab: locate behaviour in language models, and test whether a location is real."""

from . import tasks
from .model import ArchSpec, Model, load
from .tasks import Task

__all__ = ["ArchSpec", "Model", "Task", "load", "tasks"]
__version__ = "0.1.0"
