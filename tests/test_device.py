"""luna.device: one device policy for every stage; bf16 autocast for training steps only (evaluation is float32)."""

from __future__ import annotations

import pytest
import torch

from luna import training
from luna.device import DeviceError, resolve_device, use_bf16


def test_cpu_choices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("choice", ["cuda", "cuda:1"])
def test_cuda_without_gpu_is_a_one_line_error(choice: str) -> None:
    with pytest.raises(DeviceError, match=rf"^--device {choice}: CUDA is not available on this machine$"):
        resolve_device(choice)


def test_unknown_device_name() -> None:
    with pytest.raises(DeviceError, match=r"--device tpu: not a device name"):
        resolve_device("tpu")


def test_bf16_policy_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert use_bf16("on", cpu, cpu_auto=False) is True
    assert use_bf16("off", cpu, cpu_auto=True) is False
    assert use_bf16("auto", cpu, cpu_auto=False) is False
    monkeypatch.setattr("luna.device.cpu_has_native_bf16", lambda: True)
    assert use_bf16("auto", cpu, cpu_auto=True) is True
    assert training.resolve_amp("auto", cpu) is training.CPU_AMP_AUTO
    monkeypatch.setattr("luna.device.cpu_has_native_bf16", lambda: False)
    assert use_bf16("auto", cpu, cpu_auto=True) is False
    assert training.resolve_amp("auto", cpu) is False
