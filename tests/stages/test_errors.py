"""UserError helpers: one-line messages, and errors raised inside Hydra instantiation or DataLoader workers."""

import pytest
from torch.utils.data import DataLoader, Dataset

from stages.common import instantiate_or_user_error
from stages.errors import UserError, one_line


class BrokenDataset(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise UserError(f"images/{index}.png: cannot decode; expected an image file")


def refuse_negative(value: int) -> int:
    if value < 0:
        raise UserError(f"model.value: got {value}; expected >= 0")
    return value


def test_worker_user_error_is_reported_as_its_original_line():
    loader = DataLoader(BrokenDataset(), batch_size=1, num_workers=1)
    with pytest.raises(UserError) as caught:
        next(iter(loader))
    assert "\n" in str(caught.value)  # the worker's traceback rides along in the message
    assert one_line(caught.value) == "images/0.png: cannot decode; expected an image file"


def test_one_line_keeps_a_plain_message():
    assert one_line(UserError("data.json: malformed JSON")) == "data.json: malformed JSON"


def test_instantiate_lets_a_constructor_user_error_through_unwrapped():
    with pytest.raises(UserError, match=r"^model.value: got -1; expected >= 0$"):
        instantiate_or_user_error({"_target_": "tests.stages.test_errors.refuse_negative", "value": -1})
    assert instantiate_or_user_error({"_target_": "tests.stages.test_errors.refuse_negative", "value": 3}) == 3
