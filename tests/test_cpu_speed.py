"""luna.cpu_speed: each lever changes speed only — forward values bit-identical, gradients equal to fp32
reduction order, same parameters and state dict — and reports what it did. No timing assertions."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from luna import cpu_speed
from luna.data import AugmentConfig, random_affine
from luna.model import LunaModel

CL = torch.channels_last_3d


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: two OpenMP threads on a shared 2-core box can wait on each other for seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 1, 32, 48, 48, generator=g) * 200 - 600).contiguous(memory_format=CL)
    return x, torch.arange(n) % 2


def _model(fast: bool) -> LunaModel:
    torch.manual_seed(0)
    model = LunaModel().to(memory_format=CL)
    if fast:
        cpu_speed.speed_up_training(model)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_reports_success_and_can_be_undone():
    try:
        line = cpu_speed.tune_allocator()
        assert "M_MMAP_MAX=0" in line and cpu_speed.allocator_tuned()
        x = torch.ones(8, 1 << 20)  # a 32 MiB block comes from the heap now
        assert float(x.sum()) == 8 * (1 << 20)
    finally:
        assert "defaults" in cpu_speed.untune_allocator()
    assert not cpu_speed.allocator_tuned()


def test_speed_up_training_keeps_forward_buffers_and_state_dict_and_gradients():
    x, y = _batch()
    plain, fast = _model(False), _model(True)
    params_before = [id(p) for p in fast.parameters()]
    assert isinstance(fast, LunaModel)
    assert list(plain.state_dict()) == list(fast.state_dict())
    logits_plain, _ = plain(x)
    logits_fast, _ = fast(x)
    assert torch.equal(logits_plain, logits_fast)
    F.cross_entropy(logits_plain, y).backward()
    F.cross_entropy(logits_fast, y).backward()
    for (name, a), (_, b) in zip(plain.named_buffers(), fast.named_buffers()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters()):
        assert b.grad is not None and b.grad.shape == a.grad.shape, name
        assert _rel(b.grad, a.grad) < 1e-4, name
    assert [id(p) for p in fast.parameters()] == params_before


def test_training_steps_match_with_and_without_levers():
    plain, fast = _model(False), _model(True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.99) for m in (plain, fast)]
    for step in range(2):
        x, y = _batch(seed=step + 1)
        for model, opt in zip((plain, fast), opts):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x)[0], y).backward()
            opt.step()
    for (name, a), (_, b) in zip(plain.state_dict().items(), fast.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name


def test_eval_no_grad_and_autocast_run_the_plain_code():
    x, _ = _batch(2)
    plain, fast = _model(False), _model(True)
    with torch.no_grad():
        assert torch.equal(plain(x)[0], fast(x)[0])
    plain.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(plain(x)[0], fast(x)[0])
    plain.train(), fast.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(plain(x)[0], fast(x)[0])


def test_restore_training_gives_back_the_plain_classes():
    model = _model(True)
    assert type(model) is not LunaModel and type(model.block1.conv2) is cpu_speed.DepthPaddedConv3d
    assert type(model.block1.conv1) is nn.Conv3d  # one input channel: left on the plain path
    cpu_speed.restore_training(model)
    assert type(model) is LunaModel
    assert all(type(m) is nn.Conv3d for m in model.modules() if isinstance(m, nn.Conv3d))


def test_depth_padded_conv_input_and_weight_gradients():
    torch.manual_seed(1)
    conv = nn.Conv3d(3, 5, 3, padding=1)
    fast = nn.Conv3d(3, 5, 3, padding=1)
    fast.load_state_dict(conv.state_dict())
    fast.__class__ = cpu_speed.DepthPaddedConv3d
    x = torch.randn(2, 3, 6, 7, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    gy = torch.randn(2, 5, 6, 7, 5)
    out, out_fast = conv(x), fast(x2)
    assert torch.equal(out, out_fast)
    out.backward(gy)
    out_fast.backward(gy)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert _rel(fast.weight.grad, conv.weight.grad) < 1e-5 and _rel(fast.bias.grad, conv.bias.grad) < 1e-5


def test_box_sums_are_the_weight_gradient_of_an_all_ones_input():
    gy = torch.randn(3, 4, 5, 6, 7)
    ones = torch.ones(3, 1, 5, 6, 7)
    expected = torch.ops.aten.convolution_backward(gy, ones, torch.zeros(4, 1, 3, 3, 3), None, [1, 1, 1], [1, 1, 1],
                                                   [1, 1, 1], False, [0, 0, 0], 1, [False, True, False])[1]
    for layout in (gy, gy.contiguous(memory_format=CL)):
        assert torch.allclose(cpu_speed.box_sums(layout).unsqueeze(1), expected, rtol=1e-5, atol=1e-4)


def test_input_norm_conv_running_stats_with_cumulative_momentum():
    torch.manual_seed(2)
    bn, conv = nn.BatchNorm3d(1, momentum=None), nn.Conv3d(1, 4, 3, padding=1)
    bn2, conv2 = nn.BatchNorm3d(1, momentum=None), nn.Conv3d(1, 4, 3, padding=1)
    bn2.load_state_dict(bn.state_dict()), conv2.load_state_dict(conv.state_dict())
    for _ in range(2):
        x = torch.randn(2, 1, 5, 6, 7) * 50 + 10
        ref = conv(bn(x))
        out = cpu_speed.input_norm_conv(bn2, conv2, x)
        assert torch.equal(ref, out)
        ref.sum().backward()
        out.sum().backward()
    for (name, a), (_, b) in zip(bn.state_dict().items(), bn2.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in ((bn.weight, bn2.weight), (bn.bias, bn2.bias), (conv.weight, conv2.weight), (conv.bias, conv2.bias)):
        assert _rel(b.grad, a.grad) < 1e-4


def test_resample_affine_matches_grid_sample():
    x = torch.randn(4, 1, 8, 10, 12) * 300 - 500
    theta = random_affine(4, AugmentConfig(), torch.Generator().manual_seed(3))
    expected = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                             padding_mode="border", align_corners=False)
    assert torch.allclose(cpu_speed.resample_affine(x, theta), expected, rtol=0, atol=1e-2)
    coupled = theta.clone()
    coupled[:, 2, 0] = 0.2  # depth mixed into the plane: the 3-D path, unchanged
    expected = F.grid_sample(x, F.affine_grid(coupled, list(x.shape), align_corners=False), mode="bilinear",
                             padding_mode="border", align_corners=False)
    assert torch.equal(cpu_speed.resample_affine(x, coupled), expected)


def test_affine_grid_3d_matches_affine_grid():
    theta = torch.randn(3, 3, 4)
    size = [3, 1, 5, 6, 7]
    assert torch.allclose(cpu_speed.affine_grid_3d(theta, size), F.affine_grid(theta, size, align_corners=False),
                          atol=1e-5)


def test_cpu_report_names_the_isa():
    line = cpu_speed.cpu_report()
    assert torch.backends.cpu.get_cpu_capability() in line and "oneDNN ISA" in line and "torch threads" in line


def test_one_channel_weight_grad_matches_aten():
    torch.manual_seed(3)
    x = torch.randn(2, 1, 6, 7, 5).contiguous(memory_format=CL)
    gy = torch.randn(2, 4, 6, 7, 5).contiguous(memory_format=CL)
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(gy, x, torch.zeros(4, 1, 3, 3, 3), [4], [1, 1, 1],
                                                            [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1,
                                                            [False, True, True])
    got_w, got_b = cpu_speed.one_channel_weight_grad(gy, x)
    assert got_w.shape == grad_w.shape
    assert torch.allclose(got_w, grad_w, rtol=1e-5, atol=1e-5) and torch.allclose(got_b, grad_b, rtol=1e-5, atol=1e-5)


def test_pooling_before_the_second_relu_gives_the_same_values_and_gradients():
    """maxpool(relu(x)) == relu(maxpool(x)), gradients included: windows with a positive max pass the gradient
    to the same element, windows with none pass nothing (half the windows here hold no positive value)."""
    from luna.model import LunaBlock

    block = LunaBlock(2, 3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 8, 10, generator=g) - 1.2  # mostly negative: many all-negative windows
    x[0, 0, :2, :2, :2] = -0.5  # one window all negative
    windows = F.max_pool3d(x, 2, 2)
    assert (windows <= 0).float().mean() > 0.2 and (windows > 0).any()
    grad = torch.randn(2, 3, 3, 4, 5, generator=g)
    plain_in = x.clone().requires_grad_(True)
    plain = block.maxpool(block.relu2(plain_in.clone()))
    plain.backward(grad)
    fast_in = x.clone().requires_grad_(True)
    fast = cpu_speed._pool_then_relu(block, fast_in.clone())
    fast.backward(grad)
    assert torch.equal(plain, fast)
    assert torch.equal(plain_in.grad, fast_in.grad)
    assert plain_in.grad[0, 0, :2, :2, :2].abs().sum() == 0 and plain_in.grad.abs().sum() > 0
