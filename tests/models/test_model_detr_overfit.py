"""The tiny DETR can memorise two small images: the loss falls and the boxes land on the targets."""

import pytest
import torch
from torchvision.ops import box_iou

from tests.helpers.tiny_detr import tiny_detr, two_tiny_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _overfit(overrides: tuple[str, ...], iters: int) -> tuple[list[float], list[dict], list[dict]]:
    model = tiny_detr(overrides=overrides).train()
    images, targets = two_tiny_images()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(iters):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
    model.eval()
    with torch.no_grad():
        return history, model(images), targets


def _assert_memorised(history, outputs, targets):
    assert sum(history[-5:]) / 5 < 0.1 * history[0], (history[0], history[-5:])
    for out, target in zip(outputs, targets):
        iou = box_iou(target["boxes"], out["boxes"])
        for j, label in enumerate(target["labels"]):
            best = torch.nonzero(out["labels"] == label)[0, 0]  # the top-scoring detection of this class
            assert iou[j, best] > 0.5, (j, iou[j, best])


def test_tiny_detr_overfits_two_images():
    _assert_memorised(*_overfit((), iters=150))


@pytest.mark.slow
def test_tiny_detr_with_all_deformable_detr_pp_options_overfits_two_images():
    flags = ("two_stage", "mixed_query_selection", "look_forward_twice")
    _assert_memorised(*_overfit(tuple(f"model.detector.{f}=true" for f in flags), iters=150))
