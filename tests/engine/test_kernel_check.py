"""The start-up verdict the fused kernels share: one rounding step or less, or the reference."""

import logging

import pytest

from molmo_backend.engine import kernel_check

log = logging.getLogger("test.kernel_check")


@pytest.mark.parametrize(("error", "used"), [(0.0, True), (1.0, True), (1.01, False), (float("nan"), False)])
def test_a_kernel_is_used_at_one_rounding_step_or_less(error, used):
    assert kernel_check.within_one_step(log, "kernel", "the reference", lambda: error) is used


def test_a_kernel_that_cannot_run_leaves_the_reference_and_says_why(caplog):
    def broken() -> float:
        raise RuntimeError("no Triton here")

    with caplog.at_level(logging.INFO, logger=log.name):
        assert kernel_check.within_one_step(log, "kernel", "the reference", broken) is False
    assert [r.getMessage() for r in caplog.records] == ["kernel unavailable"]
    assert "no Triton here" in caplog.records[0].reason
