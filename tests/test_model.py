"""LunaModel is the book's (222,220 parameters, same layers, (N, 2) outputs); model.pt loads with weights_only."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from luna.model import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    LunaBlock,
    LunaModel,
    count_parameters,
    load_checkpoint,
    load_model,
    save_checkpoint,
    unwrap_state_dict,
)


@pytest.fixture(scope="module")
def model() -> LunaModel:
    torch.manual_seed(0)
    return LunaModel()


def test_parameter_count_is_the_books(model: LunaModel) -> None:
    assert count_parameters(model) == 222_220
    # per part: tail BN 2; blocks 1->8, 8->16, 16->32, 32->64 (two biased 3x3x3 convs each); head 1152 -> 2
    conv = lambda i, o: i * o * 27 + o  # noqa: E731
    expected = 2 + sum(conv(i, o) + conv(o, o) for i, o in [(1, 8), (8, 16), (16, 32), (32, 64)]) + 1152 * 2 + 2
    assert expected == 222_220


def test_layers_and_names_follow_the_book(model: LunaModel) -> None:
    assert isinstance(model.tail_batchnorm, nn.BatchNorm3d) and model.tail_batchnorm.num_features == 1
    channels = [(model.block1, 1, 8), (model.block2, 8, 16), (model.block3, 16, 32), (model.block4, 32, 64)]
    for block, c_in, c_out in channels:
        assert isinstance(block, LunaBlock)
        assert (block.conv1.in_channels, block.conv1.out_channels) == (c_in, c_out)
        assert (block.conv2.in_channels, block.conv2.out_channels) == (c_out, c_out)
        for conv in (block.conv1, block.conv2):
            assert conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1) and conv.bias is not None
        assert block.maxpool.kernel_size == 2 and block.maxpool.stride == 2
    assert (model.head_linear.in_features, model.head_linear.out_features) == (1152, 2)


def test_forward_shapes_and_softmax(model: LunaModel) -> None:
    model.eval()
    x = torch.randn(3, 1, 32, 48, 48) * 300 - 500
    with torch.no_grad():
        logits, probability = model(x)
    assert logits.shape == (3, 2) and probability.shape == (3, 2)
    torch.testing.assert_close(probability, torch.softmax(logits, dim=1))
    torch.testing.assert_close(probability.sum(dim=1), torch.ones(3))


def test_channels_last_gives_the_same_outputs(model: LunaModel) -> None:
    model.eval()
    x = torch.randn(2, 1, 32, 48, 48) * 300
    with torch.no_grad():
        expected, _ = model(x)
        cl_model = LunaModel()
        cl_model.load_state_dict(model.state_dict())
        cl_model.eval().to(memory_format=torch.channels_last_3d)
        got, _ = cl_model(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_init_kaiming_fan_out_weights_and_uniform_biases() -> None:
    torch.manual_seed(1)
    m = LunaModel()
    conv = m.block4.conv2  # 64 x 64 x 27 weights: a precise std estimate
    fan_out = 64 * 27
    std = conv.weight.std().item()
    assert std == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.03)
    all_biases = []
    for layer in [mod for mod in m.modules() if isinstance(mod, (nn.Conv3d, nn.Linear))]:
        fan_out = layer.weight.shape[0] * (layer.weight[0, 0].numel())
        bound = 1 / math.sqrt(fan_out)
        assert layer.bias.abs().max().item() <= bound  # uniform(-bound, bound), not the book's normal
        all_biases.append(layer.bias / bound)
    scaled = torch.cat(all_biases)
    # uniform(-1, 1): mean ~0 and std 1/sqrt(3); the book's normal(-1, 1) would have mean ~-1
    assert abs(scaled.mean().item()) < 0.15
    assert scaled.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.15)


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel (attribute ``module``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_checkpoint_round_trip_weights_only(tmp_path: Path, model: LunaModel) -> None:
    path = tmp_path / "out" / "model.pt"
    args = vars(argparse.Namespace(crops=[Path("a.h5")], lr=0.001, balanced=1))
    save_checkpoint(path, _Wrapper(model), epoch=3, val_metrics={"f1": 0.5, "precision": float("nan")},
                    args=args, device="cpu", config={"train": {"epochs": 3}})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT
    assert raw["epoch"] == 3 and raw["crop_shape"] == [32, 48, 48]
    assert raw["model_config"] == {"in_channels": 1, "conv_channels": 8, "crop_shape": [32, 48, 48]}
    assert raw["args"] == {"crops": ["a.h5"], "lr": 0.001, "balanced": 1}
    assert raw["val_metrics"]["f1"] == 0.5 and math.isnan(raw["val_metrics"]["precision"])
    assert raw["provenance"]["config"] == {"train": {"epochs": 3}}
    assert raw["provenance"]["torch_version"] == str(torch.__version__)
    assert raw["provenance"]["device"] == "cpu" and "luna_version" in raw["provenance"]
    assert len(raw["provenance"]["source_sha256"]) == 64
    assert "git_commit" in raw["provenance"]
    assert not [k for k in raw["model_state"] if k.startswith(("module.", "_orig_mod."))]
    assert set(raw["model_state"]) == set(model.state_dict())

    loaded, ckpt = load_model(path)
    assert not loaded.training and ckpt["epoch"] == 3
    model.eval()
    x = torch.randn(2, 1, 32, 48, 48) * 200
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_unwrap_state_dict_strips_ddp_and_compile_prefixes() -> None:
    state = {"module._orig_mod.head_linear.bias": torch.zeros(2), "_orig_mod.tail_batchnorm.weight": torch.ones(1)}
    assert sorted(unwrap_state_dict(state)) == ["head_linear.bias", "tail_batchnorm.weight"]


def test_channels_last_model_saves_standard_layout(tmp_path: Path) -> None:
    m = LunaModel().to(memory_format=torch.channels_last_3d)
    save_checkpoint(tmp_path / "m.pt", m, epoch=1)
    state = torch.load(tmp_path / "m.pt", weights_only=True)["model_state"]
    assert state["block1.conv1.weight"].is_contiguous()


@pytest.mark.parametrize("kind", ["text", "plain_dict", "pickled_object", "missing", "not_a_luna_model"])
def test_a_file_that_is_not_a_checkpoint_gives_one_clear_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("epoch\tsplit\n1\ttrain\n")
    elif kind == "plain_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "pickled_object":
        torch.save(argparse.Namespace(epoch=1), path)  # loads only with weights_only=False
    elif kind == "not_a_luna_model":
        torch.save({"format": CHECKPOINT_FORMAT, "model_state": {"x": torch.zeros(1)},
                    "model_config": {"in_channels": 1, "conv_channels": 8}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=str(path.name)) as info:
        if kind == "not_a_luna_model":
            load_model(path)
        else:
            load_checkpoint(path)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    if kind == "text":  # was the unpickler's "(101)": its first byte's opcode
        assert str(info.value) == f"{path}: not a luna model checkpoint (not a file torch.save wrote: it starts with " \
                                  "b'epoc')"


def test_an_empty_file_or_a_folder_for_a_checkpoint_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "empty.pt")
    assert str(info.value) == f"{tmp_path / 'empty.pt'}: not a luna model checkpoint (an empty file)"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a folder, not a model.pt"


def test_head_follows_the_crop_shape_and_too_small_shapes_are_refused(tmp_path: Path) -> None:
    from luna.model import checkpoint_crop_shape, head_features

    assert head_features(8, (32, 48, 48)) == 1152  # the book's
    model = LunaModel(crop_shape=(16, 32, 64))
    assert model.head_linear.in_features == 64 * 1 * 2 * 4
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 16, 32, 64))[0].shape == (1, 2)
    path = save_checkpoint(tmp_path / "m.pt", model, epoch=1)
    loaded, ckpt = load_model(path)
    assert checkpoint_crop_shape(ckpt) == (16, 32, 64) and loaded.crop_shape == (16, 32, 64)
    for bad in [(8, 48, 48), (32, 15, 48), (32, 48)]:
        with pytest.raises(ValueError, match=r"cannot feed LunaModel: it needs three sizes, each >= 16"):
            LunaModel(crop_shape=bad)
    # a checkpoint written before the crop shape was recorded is the book's 32x48x48
    assert checkpoint_crop_shape({"model_config": {"in_channels": 1, "conv_channels": 8}}) == (32, 48, 48)


@pytest.mark.parametrize("key, value, expected", [
    ("epoch", "x", "a whole number >= 0"),
    ("test_fold", 1.5, "a whole number >= 0"),
    ("threshold", "high", "a finite number"),
    ("threshold", float("inf"), "a finite number"),
    ("crop_shape", "abc", "three whole numbers"),
    ("args", ["tta"], "a dict"),
    ("train_series_uids", "1.2.3", "a list of series UIDs"),
])
def test_checkpoint_fields_of_the_wrong_type_are_one_line(tmp_path: Path, model: LunaModel, key: str, value,
                                                          expected: str) -> None:
    """A model.pt from another version or edited by hand: one line naming the field, not a traceback later."""
    path = save_checkpoint(tmp_path / "model.pt", model, epoch=1)
    raw = torch.load(path, weights_only=True)
    raw[key] = value
    torch.save(raw, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"{path}: checkpoint field {key} = {value!r}, expected {expected}"
