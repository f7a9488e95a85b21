"""Run machinery shared by distill, sft and grpo."""

from __future__ import annotations

import pytest

from m1.train.run import default_micro_batch


@pytest.mark.parametrize("rows,cuda,expect", [
    (16, False, 4), (8, False, 4), (6, False, 3), (7, False, 1), (3, False, 3), (1, False, 1),
    (16, True, 8), (12, True, 6), (64, True, 8), (5, True, 5),
])
def test_default_micro_batch_is_the_largest_divisor_under_the_cap(rows, cuda, expect):
    got = default_micro_batch(rows, cuda)
    assert got == expect and rows % got == 0


def test_first_nonfinite_names_the_first_bad_value_and_ignores_missing_ones():
    from m1.train.run import first_nonfinite

    assert first_nonfinite(loss=1.5, grad_norm=3.0) is None
    assert first_nonfinite(loss=None, grad_norm=2.0) is None  # a log line without a loss is not a divergence
    assert first_nonfinite(loss=float("nan"), grad_norm=float("inf"))[0] == "loss"
    assert first_nonfinite(loss=0.1, grad_norm=float("inf")) == ("grad norm", float("inf"))
