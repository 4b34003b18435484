"""Where the model runs: device choice for every stage, and bf16 autocast for training steps (evaluation is float32:
luna.inference)."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that cannot be used here; the one-line message names the option and value."""


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available (GPU ``local_rank`` under torchrun), else the CPU; ``cuda`` or ``cuda:N``
    without a GPU is an error."""
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {choice}: CUDA is not available on this machine")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if choice in ("auto", "cpu"):
        return torch.device("cpu")
    try:
        return torch.device(choice)
    except RuntimeError as exc:
        raise DeviceError(f"--device {choice}: not a device name (auto, cpu, cuda, cuda:N)") from exc


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 / AMX), where CPU autocast can pay off."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(choice: str, device: torch.device, *, cpu_auto: bool) -> bool:
    """bf16 autocast or not: ``on``/``off`` as said; ``auto`` on CUDA where the GPU supports bf16, on the CPU
    when ``cpu_auto`` (the stage's measured choice) and the CPU runs bf16 natively."""
    if choice == "on":
        return True
    if choice == "off":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_auto and cpu_has_native_bf16()
