"""train/adaptivity.input_groups: short vs long splits inputs even when lengths tie at the median."""

from __future__ import annotations

import numpy as np
import pytest
from dynprune.train.adaptivity import input_groups
from dynprune.train.evaluation import Records


def _records(lengths: list[int]) -> Records:
    n = len(lengths)
    zeros = np.zeros(n)
    return Records(
        labels=np.zeros(n, int),
        preds=np.zeros(n, int),
        loss=zeros,
        probs=np.ones((n, 2)) / 2,
        flops=zeros,
        dense_flops=np.ones(n),
        lengths=np.asarray(lengths),
        budget=0.5,
    )


@pytest.mark.parametrize(
    ("lengths", "short"),
    [
        ([10, 20, 30, 40], [1, 1, 0, 0]),  # at the median and below: short
        ([50, 128, 128, 128, 128], [1, 0, 0, 0, 0]),  # most truncated to 128: below the median is short
        ([128, 128, 128], [0, 0, 0]),  # all equal: nothing is short
    ],
)
def test_short_and_long_partition_the_inputs(lengths, short):
    groups = input_groups(_records(lengths), dense=None)
    assert groups["short"].astype(int).tolist() == short
    assert (groups["short"] ^ groups["long"]).all() and groups["all"].all()
