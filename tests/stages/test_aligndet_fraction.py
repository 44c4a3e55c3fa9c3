"""The data-fraction benchmark's statistics and its image- and box-setting arguments."""

import math

import pytest

from benchmarks.aligndet_fraction import gain, mean_sd, parse_args


def test_mean_sd_is_the_sample_standard_deviation():
    assert mean_sd([2.0, 4.0, 6.0]) == (4.0, 2.0)
    assert mean_sd([5.0]) == (5.0, 0.0)


def test_gain_is_the_difference_of_means_with_its_standard_error():
    delta, se = gain([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    assert delta == 4.0
    assert math.isclose(se, math.sqrt(1.0 / 3 + 4.0 / 3))


def test_box_settings_are_named_override_lists_after_which_common_overrides_follow():
    base = ["--out", "o", "--image-iters", "1", "--box-iters", "1", "--finetune-iters", "1"]
    args = parse_args([*base, "--box-setting", "frozen", "--box-setting", "trained", "a=1", "b=2", "--", "c=3"])
    assert args.box_settings == {"frozen": [], "trained": ["a=1", "b=2"]}
    assert args.common == ["c=3"]
    assert parse_args(base).box_settings == {"box": []}
    with pytest.raises(SystemExit):
        parse_args([*base, "--box-setting", "image"])


def test_image_settings_replace_the_default_box_setting_and_need_their_own_names():
    base = ["--out", "o", "--image-iters", "1", "--box-iters", "1", "--finetune-iters", "1"]
    args = parse_args([*base, "--image-setting", "ssl", "stage.method=self_supervised", "trainer.max_iters=8"])
    assert args.image_settings == {"ssl": ["stage.method=self_supervised", "trainer.max_iters=8"]}
    assert args.box_settings == {}
    both = parse_args([*base, "--image-setting", "ssl", "--box-setting", "frozen"])
    assert (both.image_settings, both.box_settings) == ({"ssl": []}, {"frozen": []})
    with pytest.raises(SystemExit):
        parse_args([*base, "--image-setting", "x", "--box-setting", "x"])
