"""The start-up verdict on a fused kernel that must keep its reference's roundings.

:mod:`.fused_rotary` and :mod:`.fused_mlp` each run their kernel beside the code it replaces on
the device once and measure the largest difference in rounding steps of the input's type. The
kernel is used only at one step or less (NaN fails too); a kernel that cannot run here (no
Triton, a compile error) leaves the reference in place. Both are logged, so a server's log says
which code it runs."""

from __future__ import annotations

import logging
from collections.abc import Callable


def within_one_step(log: logging.Logger, kernel: str, reference: str, measure: Callable[[], float]) -> bool:
    """Whether ``measure()`` (the kernel's largest difference from ``reference``, in rounding
    steps) is at most one; ``kernel`` and ``reference`` name them in the log."""
    try:
        error = measure()
    except Exception as exc:  # noqa: BLE001 - the reference then stays
        log.info(f"{kernel} unavailable", extra={"reason": repr(exc)[:200]})
        return False
    if not error <= 1:  # NaN fails too
        log.warning(f"{kernel} differs from {reference}: not used", extra={"steps": error})
        return False
    log.info(f"{kernel} checked", extra={"reference": reference, "rounding_steps": error})
    return True
