import math
import random

import pytest

from stages.data.subsets import fraction_indices
from stages.errors import UserError

IMAGE_IDS = list(range(1000, 1200))


def test_fraction_subset_is_stable_across_runs_and_machines():
    # sha256 ranking depends on nothing but the seed and the ids: these were recorded once and stay fixed.
    chosen = [IMAGE_IDS[i] for i in fraction_indices(IMAGE_IDS, 0.05, seed=42)]
    assert chosen == [1037, 1040, 1052, 1098, 1105, 1106, 1139, 1149, 1168, 1188]


def test_fraction_subset_of_smaller_fraction_is_inside_larger_one():
    small = {IMAGE_IDS[i] for i in fraction_indices(IMAGE_IDS, 0.1, seed=3)}
    large = {IMAGE_IDS[i] for i in fraction_indices(IMAGE_IDS, 0.5, seed=3)}
    assert len(small) == 20 and len(large) == 100
    assert small < large


def test_fraction_subset_does_not_depend_on_input_order():
    shuffled = list(IMAGE_IDS)
    random.Random(0).shuffle(shuffled)
    chosen = {IMAGE_IDS[i] for i in fraction_indices(IMAGE_IDS, 0.25, seed=7)}
    chosen_shuffled = {shuffled[i] for i in fraction_indices(shuffled, 0.25, seed=7)}
    assert chosen == chosen_shuffled


def test_fraction_subset_returns_sorted_indices_of_ceil_count_at_least_one():
    indices = fraction_indices(IMAGE_IDS, 0.013, seed=0)
    assert indices == sorted(indices) and len(indices) == math.ceil(0.013 * 200)
    assert len(fraction_indices(IMAGE_IDS, 1e-6, seed=0)) == 1
    assert fraction_indices(IMAGE_IDS, 1.0, seed=0) == list(range(200))
    # 0.3 * 10 is 3.0000000000000004 in floating point; still 3 images.
    assert len(fraction_indices(list(range(10)), 0.3, seed=0)) == 3
    assert fraction_indices([], 0.5, seed=0) == []


def test_fraction_subset_changes_with_the_seed():
    assert fraction_indices(IMAGE_IDS, 0.1, seed=0) != fraction_indices(IMAGE_IDS, 0.1, seed=1)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, "half", True])
def test_fraction_outside_unit_interval_is_a_user_error_naming_data_fraction(fraction):
    with pytest.raises(UserError, match=r"^data\.fraction: .*expected a number in \(0, 1\]"):
        fraction_indices(IMAGE_IDS, fraction, seed=0)
