"""Early stopping on a monitored validation metric (Lightning's field names)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs (Lightning's fields)."""

    monitor: str = "val_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = -1
    wait: int = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; return True when it is a new best."""
        sign = 1.0 if self.mode == "min" else -1.0
        if sign * value < sign * self.best - self.min_delta or self.best_epoch < 0:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True
        self.wait += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

