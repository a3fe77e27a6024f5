"""Edits on the heads' values through nnsight: the `Edit` and its constructors (`edit`), ITI probes and
steering (`iti`), and edits trained with IPO/DPO against the unedited model (`optimize`).

`il.edits.additive`, `il.edits.iti`, `il.edits.train`, ... are re-exported here, so callers need not know
which file holds them.
"""

from .edit import (
    FORMS, PARAMS, POSITIONS, Edit, Head, Term, additive, all_heads, apply_terms, compose, from_config, head_name,
    load, lofit, random_heads, rank1, single_heads, top_k, vector,
)
from .iti import ITIProbe, fit_iti, fit_iti_activations, iti
from .optimize import edited_logprobs, train

__all__ = [
    "FORMS", "PARAMS", "POSITIONS", "Edit", "Head", "ITIProbe", "Term", "additive", "all_heads", "apply_terms",
    "compose", "edited_logprobs", "fit_iti", "fit_iti_activations", "from_config", "head_name", "iti", "load",
    "lofit", "random_heads", "rank1", "single_heads", "top_k", "train", "vector",
]
