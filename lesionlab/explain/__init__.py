"""Explanations: Grad-CAM, guided backpropagation and Guided Grad-CAM (hooks in context managers), overlays."""
