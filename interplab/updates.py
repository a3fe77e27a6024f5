"""Localized updates: component parameter masks, batched masked fine-tuning, and the Static/Random/Free/Oracle/Foresight experiment."""
