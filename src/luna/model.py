"""The book's LunaModel (Chapters 11-14, 222,220 parameters) and the model.pt checkpoint format.

The architecture is the book's, layer for layer, so a reader finds the same module names and the same
parameter count. One deliberate difference, in the init of the biases: the book draws them from
``normal(mean=-1/sqrt(fan_out), std=1/sqrt(fan_out))`` — a leftover of a uniform init (its repository's
issue #72: ``nn.init.normal_(m.bias, -bound, bound)`` where ``uniform_`` was meant). Here they are drawn from
``uniform(-bound, bound)`` with ``bound = 1/sqrt(fan_out)``, which is what that code meant. The weights use the
book's Kaiming normal (a=0, mode fan_out, nonlinearity relu).

model.pt (DESIGN.md) is a plain dict that loads with ``torch.load(path, weights_only=True)``:
``format``, ``model_state`` (unwrapped: no ``module.``/``_orig_mod.`` prefixes), ``model_config`` (constructor
kwargs), ``epoch``, ``val_metrics``, ``args`` (plain dict) and ``provenance`` (config, luna version, git
commit, torch version, device).
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

CHECKPOINT_FORMAT = "luna-model-v1"
_PREFIXES = ("module.", "_orig_mod.")


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


class LunaModel(nn.Module):
    """Tail BatchNorm3d(1), four LunaBlocks (c, 2c, 4c, 8c channels), Linear(1152, 2) head.

    Input: (N, in_channels, 32, 48, 48) HU crops. ``forward`` returns ``(logits, softmax(logits, dim=1))``,
    both (N, 2); column 1 is the nodule class.
    """

    def __init__(self, in_channels: int = 1, conv_channels: int = 8) -> None:
        super().__init__()
        self.tail_batchnorm = nn.BatchNorm3d(1)
        self.block1 = LunaBlock(in_channels, conv_channels)
        self.block2 = LunaBlock(conv_channels, conv_channels * 2)
        self.block3 = LunaBlock(conv_channels * 2, conv_channels * 4)
        self.block4 = LunaBlock(conv_channels * 4, conv_channels * 8)
        # 32x48x48 halved four times -> 2x3x3; 8c channels (64 by default) -> 1152 features
        self.head_linear = nn.Linear(conv_channels * 8 * 2 * 3 * 3, 2)
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


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current git commit of the source tree (None outside a repository or without git)."""
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def provenance(device: str | torch.device, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where a model came from: config (if given), luna version, git commit, torch version, device."""
    from luna import __version__

    return _plain({
        "config": dict(config) if config is not None else None,
        "luna_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": str(device),
    })


def _plain(value: Any) -> Any:
    """Convert to types that ``torch.load(weights_only=True)`` accepts (dict/list/str/int/float/bool/None)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None:
        return None
    for kind in (bool, int, float, str):  # exact builtin types (torch.__version__ is a str subclass)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _plain(value.item())
        except (ValueError, RuntimeError):
            pass
    return str(value)


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
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_state": unwrap_state_dict(plain_model.state_dict()),
        "model_config": _plain(dict(model_config)),
        "epoch": int(epoch),
        "val_metrics": _plain(dict(val_metrics or {})),
        "args": _plain(dict(args or {})),
        "provenance": provenance(device, config),
    }
    if extra:
        payload.update(_plain(dict(extra)))
    atomic_torch_save(payload, path)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary name in the same folder, fsync, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _model_config_of(model: nn.Module) -> dict[str, int]:
    if isinstance(model, LunaModel):
        return {
            "in_channels": int(model.block1.conv1.in_channels),
            "conv_channels": int(model.block1.conv1.out_channels),
        }
    return {}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a model.pt with ``weights_only=True``; anything that is not a luna checkpoint raises CheckpointError."""
    path = Path(path)
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
    return ckpt


def load_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[LunaModel, dict[str, Any]]:
    """Build a LunaModel from model.pt (in eval mode) and return it with the checkpoint dict."""
    ckpt = load_checkpoint(path, map_location=map_location)
    try:
        model = LunaModel(**ckpt["model_config"])
        model.load_state_dict(ckpt["model_state"])
    except (TypeError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: checkpoint does not fit LunaModel ({first_line})") from exc
    model.to(map_location)
    model.eval()
    return model, ckpt
