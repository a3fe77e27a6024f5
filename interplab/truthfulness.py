"""Truthfulness evaluation on the organisms' misconceptions: preference data, truth and informativeness scores, the full-model baseline."""
