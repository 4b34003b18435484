"""Where the model runs: device choice for every stage, and bf16 autocast for training steps (evaluation is float32:
luna.inference)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


class DeviceError(ValueError):
    """A device that cannot be used here; the one-line message names the option and value."""


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available (GPU ``local_rank`` under torchrun), else the CPU; ``cuda`` or ``cuda:N``
    without a GPU is an error."""
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {choice}: CUDA is not available on this machine")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if local_rank >= torch.cuda.device_count():  # two processes on one GPU: NCCL fails, "Duplicate GPU"
            raise DeviceError(f"--device {choice}: process {local_rank} of this machine has no GPU of its own "
                              f"({torch.cuda.device_count()} visible): start at most that many (train.gpus)")
        return torch.device("cuda", local_rank)
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
    if device.type == "cuda":  # native only: before Ampere (V100, T4) bf16 is emulated, and slow
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_auto and cpu_has_native_bf16()


def strict_fp32(device: torch.device) -> None:
    """On CUDA, float32 convolutions and matmuls in true float32: cuDNN runs float32 convolutions in TF32 (10
    mantissa bits) on Ampere and later by default, which moved evaluation probabilities by up to ~0.03 (the
    precision policy: evaluation is float32 on every device; training with ``--amp off`` too)."""
    if device.type != "cuda":
        return
    for backend in (torch.backends.cudnn.conv, torch.backends.cuda.matmul):
        backend.fp32_precision = "ieee"


def available_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Memory a resident data set may take on ``device`` and what it is: free GPU memory on CUDA, the
    kernel's MemAvailable (else total RAM) on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "RAM"


def resident_decision(mode: str, n_bytes: int, device: torch.device, fraction: float,
                      processes_per_device: int = 1) -> tuple[bool, str]:
    """Whether the training crops (``n_bytes`` of int16) live on the device, and why (a log line).

    ``never``/``always`` as said; ``auto``: when they take at most ``fraction`` of the device's available memory
    (on the CPU shared by ``processes_per_device`` processes, each holding its own copy)."""
    size = f"{n_bytes / 2**30:.2f} GiB"
    if mode == "never":
        return False, f"streaming from the crop stores (data_on_device never; the crops take {size})"
    if mode == "always":
        return True, f"resident on {device} (data_on_device always; {size})"
    available, what = available_memory_bytes(device)
    share = available * fraction / max(1, processes_per_device if device.type == "cpu" else 1)
    if n_bytes <= share:
        return True, (f"resident on {device}: the training crops take {size}, within {fraction:g} of the "
                      f"{available / 2**30:.1f} GiB {what}")
    return False, (f"streaming from the crop stores: the training crops take {size}, more than {fraction:g} of the "
                   f"{available / 2**30:.1f} GiB {what}")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (one process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
