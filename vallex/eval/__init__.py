"""Evaluation: how intelligible a model's speech is (code-level phoneme recognizer, text gain, PER)."""
