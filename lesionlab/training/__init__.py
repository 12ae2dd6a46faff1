"""Training: fit() with weighted cross-entropy, Adam, early stopping, atomic checkpoints, exact resume, DDP."""
