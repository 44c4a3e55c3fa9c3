"""Backbone import: each supported file format, built here from a real torchvision resnet18 state dict with its
keys renamed, loads back tensor for tensor; wrong or unreadable files give one-line UserErrors."""

import argparse
import pickle
import re

import pytest
import torch
import torchvision

from stages.backbone_import import load_backbone_weights, load_into_backbone, map_weights
from stages.errors import UserError


def _randomised_state(arch: str = "resnet18") -> dict[str, torch.Tensor]:
    """A torchvision state dict with every float tensor random, so a fresh model never equals it by chance
    (BatchNorm starts at weight 1, bias 0, mean 0, var 1)."""
    torch.manual_seed(0)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    return {k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return _randomised_state()


def _backbone_keys(state: dict) -> list[str]:
    return [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]


def _assert_loads_exactly(path, reference: dict, expected_format: str) -> None:
    body = torchvision.models.resnet18(weights=None)
    report = load_into_backbone(body, path)
    assert re.search(expected_format, report.format_name), report.format_name
    loaded = body.state_dict()
    keys = _backbone_keys(reference)
    assert report.total == len(keys)
    assert sorted(report.loaded) == sorted(keys)
    assert report.missing == [] and report.shape_mismatches == [] and report.unexpected == []
    for key in keys:
        assert torch.equal(loaded[key], reference[key]), key


def _to_detectron2(state: dict) -> dict:
    """torchvision names -> detectron2 names, as numpy arrays (detectron2's model-zoo .pkl layout)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # detectron2's FrozenBatchNorm2d has no such buffer
        name = key
        name = re.sub(r"^conv1\.weight$", "stem.conv1.weight", name)
        name = re.sub(r"^bn1\.", "stem.conv1.norm.", name)
        name = re.sub(r"^fc\.", "linear.", name)
        m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", name)
        if m:
            stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
            rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
            name = f"res{stage}.{block}.{rest}"
        out[name] = value.numpy()
    return out


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_torchvision_state_dict_round_trips(tmp_path, reference, wrapper):
    path = tmp_path / "resnet18.pth"
    torch.save(reference if wrapper is None else {wrapper: reference, "epoch": 7}, path)
    _assert_loads_exactly(path, reference, "torchvision ResNet state_dict")


@pytest.mark.parametrize("flat", [False, True])
def test_detectron2_model_zoo_pickle_round_trips(tmp_path, reference, flat):
    d2 = _to_detectron2(reference)
    assert "res2.0.conv1.norm.running_var" in d2 and "res3.0.shortcut.norm.weight" in d2
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump(d2 if flat else {"model": d2, "__author__": "test"}, f)
    _assert_loads_exactly(path, reference, "detectron2 model-zoo pickle")


def test_detectron2_detector_checkpoint_with_prefix_round_trips(tmp_path, reference):
    d2 = {f"backbone.bottom_up.{k}": torch.from_numpy(v) for k, v in _to_detectron2(reference).items()}
    d2["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 8)
    path = tmp_path / "model_final.pth"
    torch.save({"model": d2, "iteration": 100}, path)
    _assert_loads_exactly(path, reference, "detectron2 checkpoint")


def test_timm_checkpoint_round_trips_and_prefers_ema_weights(tmp_path, reference):
    path = tmp_path / "timm_checkpoint.pth.tar"
    not_ema = {k: v + 1 if v.is_floating_point() else v for k, v in reference.items()}
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=[1, 2])
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": not_ema, "state_dict_ema": reference, "args": args}, path)
    _assert_loads_exactly(path, reference, "timm ResNet checkpoint")


def test_moco_v2_checkpoint_loads_the_query_encoder(tmp_path, reference):
    state = {f"module.encoder_q.{k}": v for k, v in reference.items() if not k.startswith("fc.")}
    state |= {f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in reference.items()}
    state |= {"module.encoder_q.fc.0.weight": torch.ones(512, 512), "module.queue": torch.ones(128, 16)}
    path = tmp_path / "moco_v2.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    _assert_loads_exactly(path, reference, "MoCo v2")


def test_moco_v3_checkpoint_loads_the_base_encoder(tmp_path, reference):
    state = {f"module.base_encoder.{k}": v for k, v in reference.items()}
    state |= {f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in reference.items()}
    path = tmp_path / "moco_v3.pth.tar"
    torch.save({"state_dict": state}, path)
    _assert_loads_exactly(path, reference, "MoCo v3")


def test_byol_checkpoint_loads_the_online_network(tmp_path, reference):
    state = {f"online_network.{k}": v for k, v in reference.items()}
    state |= {f"target_network.{k}": torch.zeros_like(v) for k, v in reference.items()}
    state["predictor.net.0.weight"] = torch.ones(4, 4)
    path = tmp_path / "byol.pth"
    torch.save(state, path)
    _assert_loads_exactly(path, reference, "BYOL-style")


def test_load_backbone_weights_returns_torchvision_names_without_classifier(tmp_path, reference):
    path = tmp_path / "byol.pth"
    torch.save({f"online_encoder.{k}": v for k, v in reference.items()}, path)
    state, format_name = load_backbone_weights(path)
    assert "BYOL" in format_name
    assert set(state) == {k for k in reference if not k.startswith("fc.")}
    assert torch.equal(state["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])


def test_resnet50_file_into_resnet18_is_refused_naming_both_depths(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": _randomised_state("resnet50"), "args": argparse.Namespace(model="resnet50")}, path)
    body = torchvision.models.resnet18(weights=None)
    before = body.conv1.weight.clone()
    with pytest.raises(UserError, match=r"weights\.pth: looks like a timm ResNet checkpoint of a resnet50") as err:
        load_into_backbone(body, path)
    assert "resnet18" in str(err.value) and "depth=50" in str(err.value) and "\n" not in str(err.value)
    assert torch.equal(body.conv1.weight, before)  # nothing was loaded


def test_file_that_fills_almost_nothing_is_refused(tmp_path, reference):
    path = tmp_path / "stem_only.pth"
    torch.save({k: v for k, v in reference.items() if k.startswith(("conv1.", "bn1."))}, path)
    with pytest.raises(UserError, match=r"stem_only\.pth: looks like a torchvision ResNet state_dict but only 5 of"):
        load_into_backbone(torchvision.models.resnet18(weights=None), path)


def test_report_lists_shape_mismatches_missing_and_unexpected(tmp_path, reference):
    state = dict(reference)
    state["layer4.1.conv2.weight"] = torch.zeros(512, 512, 1, 1)
    del state["layer4.1.bn2.bias"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    report = load_into_backbone(torchvision.models.resnet18(weights=None), path)
    assert report.shape_mismatches == [("layer4.1.conv2.weight", (512, 512, 1, 1), (512, 512, 3, 3))]
    assert report.missing == ["layer4.1.bn2.bias"]
    assert report.unexpected == ["layer5.0.conv1.weight"]
    assert len(report.loaded) == report.total - 2
    assert "shape mismatches 1" in report.summary()


def test_detectron2_bottleneck_pickle_warns_about_stride_placement(tmp_path):
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _to_detectron2(_randomised_state("resnet50")), "__author__": "Detectron2"}, f)
    weights = map_weights(path)
    assert any("stride" in w for w in weights.warnings)
    assert weights.state["layer1.0.downsample.1.running_var"].shape == (256,)


def test_missing_file_raises_user_error(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.pth: weights file not found"):
        load_backbone_weights(tmp_path / "nowhere.pth")


def test_unreadable_file_raises_user_error(tmp_path):
    path = tmp_path / "garbage.pkl"
    path.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(UserError, match=r"garbage\.pkl: not a readable"):
        load_backbone_weights(path)


class _Arbitrary:
    pass


def test_pickle_with_python_objects_needs_allow_pickle(tmp_path, reference):
    path = tmp_path / "objects.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _to_detectron2(reference), "extra": _Arbitrary()}, f)
    with pytest.raises(UserError, match=r"objects\.pkl: pickle holds more than arrays .*allow_pickle"):
        load_backbone_weights(path)
    state, _ = load_backbone_weights(path, allow_pickle=True)
    assert torch.equal(state["conv1.weight"], reference["conv1.weight"])


def test_loads_into_the_pipeline_resnet_backbone_body(tmp_path, reference):
    backbone_module = pytest.importorskip("models.layers.backbone")
    backbone = backbone_module.ResNetBackbone(depth=18, norm="frozen_bn", frozen_stages=0, out_levels=[3, 4, 5])
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    report = load_into_backbone(backbone.body, path)
    assert report.missing == [] and report.shape_mismatches == []
    body_state = backbone.body.state_dict()
    for key in _backbone_keys(body_state):
        assert torch.equal(body_state[key], reference[key]), key
