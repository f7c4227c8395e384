"""Evaluation of what a model says: text gain, phoneme error rate of synthesized speech, listening samples."""
