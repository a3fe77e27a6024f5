"""Edits: steering (ITI), learned per-head interventions and their optimization, applied through nnsight."""
