"""Per-step schedules (Sec. 3.3, 3.4, App. C.2.1): learning rate, GEMA momentum, noise, lambda_bal in pretraining; learning rate in fine-tuning."""

from __future__ import annotations

import math


def cosine(start: float, end: float, step: int, total: int) -> float:
    """Half-cycle cosine from ``start`` (step 0) to ``end`` (step ``total``), constant after."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(peak: float, final: float, step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then half-cycle cosine to ``final``."""
    if step < warmup:
        return peak * step / warmup
    return cosine(peak, final, step - warmup, total - warmup)


def warmup_warning(epochs: int, warmup_epochs: int | None) -> str | None:
    """What to warn of when the warm-up takes the whole run (every step below the peak rate, no decay), else None."""
    if warmup_epochs is not None and warmup_epochs >= epochs:
        return (f"warmup_epochs {warmup_epochs} >= epochs {epochs}: the whole run trains at warm-up learning rates "
                f"(set warmup_epochs below epochs)")
    return None
