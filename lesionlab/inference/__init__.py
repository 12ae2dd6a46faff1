"""Inference: the Predictor and its engines, test-time augmentation, ensembling and clinic bundles."""
