"""The book's LunaModel (Chapters 11-14, 222,220 parameters) and the model.pt checkpoint format.

The architecture is the book's, layer for layer, so a reader finds the same module names and the same
parameter count. One deliberate difference, in the init of the biases: the book draws them from
``normal(mean=-1/sqrt(fan_out), std=1/sqrt(fan_out))`` — a leftover of a uniform init (its repository's
issue #72: ``nn.init.normal_(m.bias, -bound, bound)`` where ``uniform_`` was meant). Here they are drawn from
``uniform(-bound, bound)`` with ``bound = 1/sqrt(fan_out)``, which is what that code meant. The weights use the
book's Kaiming normal (a=0, mode fan_out, nonlinearity relu).

The head's input size follows the crop shape: ``8c * prod(shape // 16)`` features, 1152 for the book's
32x48x48 (each of the four blocks halves every axis, so every axis needs at least 16 voxels).

model.pt (docs/design.md, "model.pt") is a plain dict that loads with ``torch.load(path, weights_only=True)``:
``format``, ``model_state`` (unwrapped: no ``module.``/``_orig_mod.`` prefixes), ``model_config`` (constructor
kwargs, the crop shape among them), ``crop_shape``, ``epoch``, ``val_metrics``, ``args`` (plain dict) and
``provenance`` (config, luna version and source hash, git commit, torch version, device); the training stage
adds the test fold, the training and selection series UIDs and the operating threshold.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from luna.cropping import MIN_CROP_SIZE  # four 2x max-pools: every axis needs >= 16 voxels
from luna.io import atomic_path
from luna.provenance import plain, provenance

CHECKPOINT_FORMAT = "luna-model-v1"
_PREFIXES = ("module.", "_orig_mod.")
BOOK_CROP_SHAPE = (32, 48, 48)


class CheckpointError(ValueError):
    """A file that is not a readable luna checkpoint; the message names the file."""


class LunaBlock(nn.Module):
    """conv3d(3, pad 1) -> ReLU -> conv3d(3, pad 1) -> ReLU -> maxpool(2): halves each spatial size."""

    def __init__(self, in_channels: int, conv_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(conv_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(2, 2)

    def forward(self, input_batch: torch.Tensor) -> torch.Tensor:
        block_out = self.conv1(input_batch)
        block_out = self.relu1(block_out)
        block_out = self.conv2(block_out)
        block_out = self.relu2(block_out)
        return self.maxpool(block_out)


def check_crop_shape(crop_shape: Sequence[int]) -> tuple[int, int, int]:
    """The crop shape as three ints, each >= 16 (what LunaModel's four max-pools need); ValueError otherwise."""
    shape = tuple(int(v) for v in crop_shape)
    if len(shape) != 3 or min(shape) < MIN_CROP_SIZE:
        raise ValueError(f"crop shape {list(shape)} cannot feed LunaModel: it needs three sizes, each >= "
                         f"{MIN_CROP_SIZE} (four 2x max-pools)")
    return shape  # type: ignore[return-value]


def head_features(conv_channels: int, crop_shape: Sequence[int]) -> int:
    """Inputs of the head: 8c channels times the crop shape halved four times (1152 for the book's)."""
    size = 1
    for v in check_crop_shape(crop_shape):
        size *= v // 16
    return conv_channels * 8 * size


class LunaModel(nn.Module):
    """Tail BatchNorm3d(1), four LunaBlocks (c, 2c, 4c, 8c channels), Linear(1152, 2) head.

    Input: (N, in_channels, *crop_shape) HU crops, the book's 32x48x48 by default (the head takes
    :func:`head_features` inputs). ``forward`` returns ``(logits, softmax(logits, dim=1))``, both (N, 2);
    column 1 is the nodule class.
    """

    def __init__(self, in_channels: int = 1, conv_channels: int = 8,
                 crop_shape: Sequence[int] = BOOK_CROP_SHAPE) -> None:
        super().__init__()
        self.crop_shape = check_crop_shape(crop_shape)
        self.tail_batchnorm = nn.BatchNorm3d(1)
        self.block1 = LunaBlock(in_channels, conv_channels)
        self.block2 = LunaBlock(conv_channels, conv_channels * 2)
        self.block3 = LunaBlock(conv_channels * 2, conv_channels * 4)
        self.block4 = LunaBlock(conv_channels * 4, conv_channels * 8)
        # 32x48x48 halved four times -> 2x3x3; 8c channels (64 by default) -> 1152 features
        self.head_linear = nn.Linear(head_features(conv_channels, self.crop_shape), 2)
        self.head_softmax = nn.Softmax(dim=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if type(m) in {nn.Linear, nn.Conv3d}:
                nn.init.kaiming_normal_(m.weight.data, a=0, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    _, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight.data)
                    bound = 1 / math.sqrt(fan_out)
                    nn.init.uniform_(m.bias, -bound, bound)  # the book's issue #72: uniform was meant

    def forward(self, input_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn_output = self.tail_batchnorm(input_batch)
        block_out = self.block1(bn_output)
        block_out = self.block2(block_out)
        block_out = self.block3(block_out)
        block_out = self.block4(block_out)
        conv_flat = block_out.reshape(block_out.size(0), -1)  # reshape: also right for channels_last input
        linear_output = self.head_linear(conv_flat)
        return linear_output, self.head_softmax(linear_output)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrap_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without DistributedDataParallel (``module.``) or torch.compile (``_orig_mod.``) prefixes,
    with every tensor on the CPU and contiguous (so a channels_last model saves in the standard layout)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel and/or torch.compile wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    epoch: int,
    val_metrics: Mapping[str, Any] | None = None,
    args: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write model.pt atomically (temp file + rename); returns the path.

    ``model`` may be wrapped (DDP, torch.compile); the saved state is the plain module's, on the CPU.
    ``model_config`` defaults to the model's own constructor kwargs. ``extra`` adds further plain keys.
    """
    path = Path(path)
    plain_model = unwrap_model(model)
    if model_config is None:
        model_config = getattr(plain_model, "model_config", None) or _model_config_of(plain_model)
    model_config = dict(model_config)
    if isinstance(plain_model, LunaModel):
        model_config.setdefault("crop_shape", list(plain_model.crop_shape))
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_state": unwrap_state_dict(plain_model.state_dict()),
        "model_config": plain(model_config),
        "crop_shape": plain(model_config.get("crop_shape", list(BOOK_CROP_SHAPE))),
        "epoch": int(epoch),
        "val_metrics": plain(dict(val_metrics or {})),
        "args": plain(dict(args or {})),
        "provenance": provenance(device, config),
    }
    if extra:
        payload.update(plain(dict(extra)))
    atomic_torch_save(payload, path)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through luna.io.atomic_path: a temp name in the same folder, fsync, then rename into place (an
    OutputError naming ``path`` when it cannot be written)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)  # through a file object: the archive's inner folder is "archive", not the temp name


def _model_config_of(model: nn.Module) -> dict[str, int]:
    if isinstance(model, LunaModel):
        return {
            "in_channels": int(model.block1.conv1.in_channels),
            "conv_channels": int(model.block1.conv1.out_channels),
            "crop_shape": list(model.crop_shape),
        }
    return {}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a model.pt with ``weights_only=True``; anything that is not a luna checkpoint raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a model.pt")
    try:
        with open(path, "rb") as fh:
            start = fh.read(4)
    except OSError:
        start = b"PK\x03\x04"  # torch.load below names the error
    if not start:
        raise CheckpointError(f"{path}: not a luna model checkpoint (an empty file)")
    if start != b"PK\x03\x04" and start[:1] != b"\x80":  # torch.save's zip, or a legacy pickle
        raise CheckpointError(f"{path}: not a luna model checkpoint (not a file torch.save wrote: it starts "
                              f"with {start!r})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint file") from exc
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a luna model checkpoint ({first_line})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a luna model checkpoint (no format key {CHECKPOINT_FORMAT!r})")
    for key in ("model_state", "model_config", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: luna checkpoint without {key!r}")
    _check_fields(path, ckpt)
    return ckpt


def _check_fields(path: Path, ckpt: Mapping[str, Any]) -> None:
    """The fields the apps read are of their types (a file from another version or edited by hand: one line)."""
    def bad(key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: checkpoint field {key} = {ckpt[key]!r}, expected {expected}")

    for key in ("epoch", "test_fold"):
        if key in ckpt and (isinstance(ckpt[key], bool) or not isinstance(ckpt[key], int) or ckpt[key] < 0):
            raise bad(key, "a whole number >= 0")
    if "threshold" in ckpt and (isinstance(ckpt["threshold"], bool) or not isinstance(ckpt["threshold"], (int, float))
                                or not math.isfinite(ckpt["threshold"])):
        raise bad("threshold", "a finite number")  # NaN would call every candidate negative
    if not isinstance(ckpt["model_config"], dict):
        raise bad("model_config", "a dict")
    if "args" in ckpt and not isinstance(ckpt["args"], dict):
        raise bad("args", "a dict")
    shape = ckpt.get("crop_shape")
    if shape is not None and not (isinstance(shape, (list, tuple)) and len(shape) == 3
                                  and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
        raise bad("crop_shape", "three whole numbers")
    for key in ("train_series_uids", "selection_series_uids"):
        if key in ckpt and not isinstance(ckpt[key], (list, tuple)):
            raise bad(key, "a list of series UIDs")


def seen_scans(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """``{series_uid: role}`` of the scans the model was trained (``train``) or chose on (``selection``), as
    model.pt records them: never held out."""
    return {str(uid): role for role in ("selection", "train") for uid in checkpoint.get(f"{role}_series_uids", [])}


def not_held_out(uids: Sequence[str], checkpoint: Mapping[str, Any], *, model_path: str | os.PathLike,
                 splits_path: str | os.PathLike, fold_name: str, verb: str) -> str | None:
    """The one-line refusal when some of a fold's ``uids`` are :func:`seen_scans` of the model (a splits.tsv
    other than the model's), else None: numbers on them would not be held-out numbers."""
    seen = seen_scans(checkpoint)
    leaked = [uid for uid in uids if str(uid) in seen]
    if not leaked:
        return None
    return (f"{splits_path}: {len(leaked)} of the {len(uids)} scans of {fold_name} are in {model_path}'s "
            f"{seen[str(leaked[0])]} scans (e.g. {leaked[0]}); {verb} with the splits.tsv the model was trained with")


def checkpoint_crop_shape(ckpt: Mapping[str, Any]) -> tuple[int, ...]:
    """The crop shape a checkpoint was trained on (older checkpoints without one: the book's 32x48x48)."""
    shape = ckpt.get("crop_shape") or ckpt.get("model_config", {}).get("crop_shape") or BOOK_CROP_SHAPE
    return tuple(int(v) for v in shape)


def load_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[LunaModel, dict[str, Any]]:
    """Build a LunaModel from model.pt (in eval mode) and return it with the checkpoint dict."""
    ckpt = load_checkpoint(path, map_location=map_location)
    try:
        model = LunaModel(**ckpt["model_config"])
        model.load_state_dict(ckpt["model_state"])
    except (TypeError, RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: checkpoint does not fit LunaModel ({first_line})") from exc
    model.to(map_location)
    model.eval()
    return model, ckpt
