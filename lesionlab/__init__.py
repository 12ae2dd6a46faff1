"""LesionLab: reproducible dermoscopy lesion classification (decision support, not diagnosis)."""

__version__ = "0.1.0"
