"""Class weights for the weighted cross-entropy (inverse class frequency)."""

from __future__ import annotations

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from lesionlab.labels import NUM_CLASSES


def class_weights(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Inverse-frequency weights w_c = n / (K * n_c) over the K classes present (scikit-learn's "balanced").

    A class absent from `labels` gets weight 0 (it never appears as a target).
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    w = np.zeros(num_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return w

