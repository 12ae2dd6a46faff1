"""Inference: the Predictor, its outputs, its CPU engines, test-time augmentation and perturbed copies."""
