"""luna.device: one device policy for every stage; bf16 autocast for training steps only (evaluation is float32)."""

from __future__ import annotations

import pytest
import torch

from luna import training
from luna.device import DeviceError, resolve_device, strict_fp32, use_bf16


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


def test_cuda_choices_with_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """One GPU per process under torchrun (two ranks on one GPU made NCCL fail with "Duplicate GPU"); bf16 only
    where the GPU runs it natively (V100/T4 emulate it: torch's check counts emulation unless told not to)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"^--device auto: process 2 of this machine has no GPU of its own \(2 "
                                          r"visible\): start at most that many \(train.gpus\)$"):
        resolve_device("auto", local_rank=2)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or not including_emulation)
    assert use_bf16("auto", torch.device("cuda", 0), cpu_auto=False) is True and asked == [False]


def test_strict_fp32_turns_tf32_off_on_cuda_only() -> None:
    """cuDNN runs float32 convolutions in TF32 on Ampere and later unless told: evaluation would not be float32."""
    backends = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    before = [b.fp32_precision for b in backends]
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        strict_fp32(torch.device("cpu"))
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        strict_fp32(torch.device("cuda", 0))
        assert [b.fp32_precision for b in backends] == ["ieee", "ieee"]
    finally:
        for backend, value in zip(backends, before):
            backend.fp32_precision = value
