"""Speed levers for fp32 training on a plain x86 CPU (AVX2, no native bf16), each measured on this repo's
2-core AMD EPYC (Zen 3, AVX2, KVM) box with LunaModel, batch 32, channels_last_3d, 2 torch threads
(benchmarks/train.py, benchmarks/results/train.md; the box is shared and noisy: +-15% between runs, so
every number below comes from interleaved rounds in one process or alternating processes).

None of them changes the model, its init, the loss or what a forward pass computes: forward outputs are
bit-identical, gradients differ from plain eager ones by fp32 reduction order only (relative L2 difference
~1e-6, against ~0.16 between two batches); tests/test_cpu_speed.py checks both.

* :func:`tune_allocator` — glibc's malloc hands every freed block of 32 MiB or more back to the kernel
  (mmap/munmap), and block1's activations and gradients are 75.5 MB each at batch 32 (32 x 8 x 32 x 48 x 48
  fp32): every step then touches ~7 such blocks as fresh zero pages, 120,000-150,000 page faults (0.3-0.45 s of system
  time a step when faults are dear on this VM). Keeping big blocks on the heap ends the faults: 1.1-1.35x on
  the training step (the cost of a fault varies with the VM's state), 1.3x on validation's forward pass
  (batch 64: 455 -> 346 ms); ~+0.1-0.25 GB resident. This is also why ``aten::threshold_backward`` (ReLU
  backward, ~80 ms a call) and ``aten::fill_`` (~70 ms) look slow in torch.profiler: they are the first to
  touch the fresh pages (without faults: ~7 ms and ~4 ms). The profiler's own allocations bring the faults
  back even with the allocator tuned, so time those ops without it.
* :func:`speed_up_training` — exact rewrites of the backward pass of the convolutions, ~1.4x on the step
  (all other levers on, the step without them runs at 0.71x):
  - oneDNN's JIT AVX2 kernel for convolution weight gradients refuses depth padding (``f_pad == 0`` is one of
    its conditions), so every 3-D conv with ``padding=1`` falls back to im2col + GEMM (``x64:gemm:jit`` in
    ``ONEDNN_VERBOSE``), which copies a 27x input per image. Padding the input in depth by hand (``F.pad``)
    and convolving with ``padding=(0, 1, 1)`` gives the same sums through the JIT kernel: weight gradients
    1.1-2.5x faster (block1.conv2: ~200 -> ~80 ms at batch 32 on 2 cores).
  - block1.conv1 reads the tail BatchNorm's output, whose own input (the batch) needs no gradient; the plain
    backward computes the full-resolution gradient of that output (~60 ms) only for the BatchNorm's two
    parameters. Here conv1's weight gradient is taken against the normalised input ``xhat`` and the
    BatchNorm's gradients follow in closed form (``grad_gamma = sum(w * G_xhat)``,
    ``grad_beta = sum(w * G_1)``, ``grad_w = gamma G_xhat + beta G_1``, ``G_1`` box sums of the output
    gradient); that weight gradient itself runs as a 3-channel (3, 3, 1) conv over width shifts of ``xhat``,
    a JIT path ~4x faster than the 1-channel GEMM one (:func:`one_channel_weight_grad`).
  - each block's ``maxpool(relu2(x))`` runs as ``relu2(maxpool(x))`` (:func:`_pool_then_relu`): max and ReLU
    commute, so the values are bit-identical and the gradients equal (a window with a positive max passes
    its gradient to the same element; one without passes none either way), and ReLU's forward and backward
    touch an eighth of the voxels: block1's ~3.7 + ~9.7 ms become ~0.5 + ~1.2 ms, 1.02-1.035x on the step
    (medians of 8 interleaved rounds, emulated AVX2 and native AVX-512, 2026-12-02). Tried with it and not
    kept: writing block1's first ReLU straight into a depth-padded buffer for conv2 (no ``F.pad`` copy): 0.95x.
* :func:`resample_affine` — augment_batch's ``affine_grid`` + 3-D ``grid_sample`` as a 2-D resampling of the
  slices plus a linear interpolation in depth (exact for AugmentConfig's affines, which never mix depth into
  the plane): ~60 -> ~15 ms per batch of 32 on 2 cores, 1.05-1.15x on the step; values equal to fp32
  rounding.
  :func:`affine_grid_3d` is ``F.affine_grid`` for 5-D sizes by broadcasting (~6x faster than its bmm).
* :func:`cpu_report` — one log line: ATen's CPU capability, the ISA oneDNN runs (its verbose header), native
  bf16, threads, and ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` / ``OMP_*`` when set (the AVX2
  emulation on AVX-512 CPUs: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``, bf16 off).

Not a function here because it must be set before torch is imported: ``OMP_WAIT_POLICY=ACTIVE`` (libgomp's
threads spin between parallel regions instead of sleeping; :func:`luna.runner.spin_openmp_threads`, which the
train and predict rule scripts call first). Quiet box: ~+3%; next to another CPU-bound
process, even a niced one: 45 vs 1.4 samples/s (a sleeping thread waits milliseconds for its core, hundreds
of times a step); ``PASSIVE``: 0.7x. One torch thread instead of 2: ~0.55x.

Measured and not used: torch.compile (inductor, CPU) on top of these levers: 0.9-1.04x, for 26-75 s of
compilation on 2 cores (gradients ~7e-5 from eager); jemalloc (LD_PRELOAD): more page faults than glibc
(170,000-210,000 a step), 0.6-0.85x; tcmalloc (LD_PRELOAD): no faults either and 0.95-1.25x of the tuned
glibc in paired runs — a launcher option, not something the app can do; transparent huge pages
(``THP_MEM_ALLOC_ENABLE=1``): slower; ReLU not in place: same speed; the int16 -> float conversion (0.3 ms),
``zero_grad(set_to_none=True)`` (0.03 ms) and the SGD step (0.35 ms) are not worth touching; oneDNN off
(``torch.backends.mkldnn``): weight gradients 2-30x slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from luna.model import LunaModel

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30      # keep up to 1 GiB of freed memory at the top of the heap
_DEFAULT_MMAP_MAX = 65536      # glibc's default
_DEFAULT_MMAP_THRESHOLD = 32 << 20   # glibc's dynamic threshold settles at <= 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX)

_state: dict[str, Any] = {"allocator": False}


# ----------------------------------------------------------------------------------------------------
# allocator
# ----------------------------------------------------------------------------------------------------

def _libc() -> Any | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def _preloaded_allocator() -> str | None:
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return name
    return None


def tune_allocator() -> str:
    """Keep large freed blocks on glibc's heap instead of returning them to the kernel; returns a log line.

    ``mallopt(M_MMAP_MAX, 0)`` (no mmap-backed blocks) and ``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` (shrink the
    heap only past 1 GiB of free memory at its top). A training step then reuses the same pages for
    block1's 75.5 MB tensors (batch 32) instead of 120,000-150,000 page faults: 1.1-1.35x on the training step
    and 1.3x on validation's forward pass on the 2-core AVX2 box (benchmarks/results/train.md). Costs: freed
    memory stays with the process (up to 1 GiB above its peak; measured +0.1-0.25 GB). Call once, early
    (before the model and loaders are built; loader workers forked later inherit it). Process-wide and
    harmless on GPUs too. Nothing is done when the C library is not glibc or another allocator is preloaded
    (the line says so)."""
    other = _preloaded_allocator()
    if other:
        return f"allocator: {other} preloaded (LD_PRELOAD); glibc malloc left as is"
    libc = _libc()
    if libc is None:
        return f"allocator: C library is not glibc ({platform.libc_ver()[0] or platform.system()}); left as is"
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not ok:
        return "allocator: glibc mallopt refused M_MMAP_MAX/M_TRIM_THRESHOLD; left as is"
    _state["allocator"] = True
    return ("allocator: glibc malloc keeps large blocks on the heap (mallopt M_MMAP_MAX=0, "
            "M_TRIM_THRESHOLD=1 GiB): no page faults per step")


def untune_allocator() -> str:
    """Back to (approximately) glibc's default: big blocks mmap-backed and unmapped when freed.

    For benchmarks that interleave runs with and without :func:`tune_allocator` in one process. glibc's
    default threshold is dynamic (it rises to the largest freed mmap-backed block, at most 32 MiB); this
    sets it to that ceiling, which is where it ends up after a training step (block2's 18.9 MB tensors on
    the heap, block1's 75.5 MB ones mmap-backed)."""
    libc = _libc()
    if libc is None or _preloaded_allocator():
        return "allocator: not glibc malloc; nothing to undo"
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * _DEFAULT_MMAP_THRESHOLD)
    _state["allocator"] = False
    return "allocator: glibc defaults (mmap threshold 32 MiB, trim threshold 64 MiB)"


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` is in effect (in this process)."""
    return bool(_state["allocator"])


# ----------------------------------------------------------------------------------------------------
# convolution backward
# ----------------------------------------------------------------------------------------------------

_conv_backward = torch.ops.aten.convolution_backward
CL_3D = torch.channels_last_3d


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _fp32_cpu_training(*tensors: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and not _autocast_on()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


class _DepthPaddedWeightGrad(torch.autograd.Function):
    """conv3d(x, w, b, stride 1, ``padding``) whose weight gradient runs on a depth-padded copy of ``x``
    (oneDNN's AVX2 JIT kernel instead of im2col + GEMM); forward and input gradient as aten computes them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, 1, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        pd, ph, pw = ctx.padding
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_backward(grad_out, x, weight, bias_sizes, [1, 1, 1], [pd, ph, pw], [1, 1, 1], False,
                                    [0, 0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            x_padded = F.pad(x, (0, 0, 0, 0, pd, pd))
            _, grad_w, grad_b = _conv_backward(grad_out, x_padded, weight, bias_sizes, [1, 1, 1], [0, ph, pw],
                                               [1, 1, 1], False, [0, 0, 0], 1, [False, True, ctx.has_bias])
        return grad_x, grad_w, grad_b, None


class DepthPaddedConv3d(nn.Conv3d):
    """An ``nn.Conv3d`` (same parameters, same state dict) whose fp32 CPU training backward computes the
    weight gradient through :class:`_DepthPaddedWeightGrad`. Anything else (eval, no_grad, autocast, CUDA,
    strides, dilation, groups, other padding modes) runs ``nn.Conv3d.forward`` unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Module's name
        if (self.padding_mode == "zeros" and self.groups == 1 and tuple(self.stride) == (1, 1, 1)
                and tuple(self.dilation) == (1, 1, 1) and isinstance(self.padding, tuple)
                and self.padding[0] > 0 and self.weight.requires_grad and _fp32_cpu_training(input, self.weight)):
            return _DepthPaddedWeightGrad.apply(input, self.weight, self.bias, tuple(self.padding))
        return super().forward(input)


def box_sums(grad_out: torch.Tensor) -> torch.Tensor:
    """(O, 3, 3, 3): for each output channel and kernel offset k of a 3x3x3 conv with padding 1, the sum of
    ``grad_out`` (N, O, D, H, W) over the positions whose input tap ``q + k - 1`` lies inside the volume —
    the weight gradient of that conv for an all-ones input."""
    n, o, d, h, w = grad_out.shape
    cl = grad_out.permute(0, 2, 3, 4, 1)  # (N, D, H, W, O): a view, contiguous for channels_last_3d
    if cl.is_contiguous():
        total = cl.reshape(n * d, h * w * o).sum(0).view(h, w, o)
    else:
        total = cl.sum((0, 1))
    first, last = cl[:, 0].sum(0), cl[:, d - 1].sum(0)
    s = torch.stack([total - first, total, total - last])      # (kd, H, W, O)
    s = torch.stack([s.sum(1) - s[:, 0], s.sum(1), s.sum(1) - s[:, h - 1]], dim=1)  # (kd, kh, W, O)
    s = torch.stack([s.sum(2) - s[:, :, 0], s.sum(2), s.sum(2) - s[:, :, w - 1]], dim=2)  # (kd, kh, kw, O)
    return s.permute(3, 0, 1, 2).contiguous()


def one_channel_weight_grad(grad_out: torch.Tensor, x: torch.Tensor,
                            with_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (O, 1, 3, 3, 3) and bias gradients of ``conv3d(x, w, b, padding=1)`` for a 1-channel ``x``
    (N, 1, D, H, W), computed as the weight gradient of a (3, 3, 1)-kernel conv over the three width shifts
    of ``x`` stacked as 3 channels (depth padded by hand): oneDNN's JIT AVX2 kernel has a path for exactly 3
    input channels, ~4x faster than the im2col + GEMM path the 1-channel conv takes (~100 -> ~25 ms for
    block1.conv1 at batch 32 on 2 cores)."""
    n, _, d, h, w = x.shape
    o = grad_out.shape[1]
    padded = F.pad(x, (1, 1, 0, 0, 1, 1))  # width by 1 for the shifts, depth by 1 for the JIT kernel
    shifts = torch.cat([padded[..., k:k + w] for k in range(3)], dim=1).contiguous(memory_format=CL_3D)
    weight = torch.empty((o, 3, 3, 3, 1), dtype=x.dtype).contiguous(memory_format=CL_3D)  # only its shape is used
    _, grad_w, grad_b = _conv_backward(grad_out, shifts, weight, [o] if with_bias else None, [1, 1, 1], [0, 1, 0],
                                       [1, 1, 1], False, [0, 0, 0], 1, [False, True, with_bias])
    # (O, kw, kd, kh, 1) -> (O, 1, kd, kh, kw)
    return grad_w.reshape(o, 3, 3, 3).permute(0, 2, 3, 1).unsqueeze(1), grad_b


class _InputNormConv(torch.autograd.Function):
    """conv3d(bn_out, w, b, padding 1) where ``bn_out = gamma * xhat + beta`` is a 1-channel BatchNorm of an
    input that needs no gradient: the backward takes conv's weight gradient against ``xhat`` and derives
    the BatchNorm's gradients from it, instead of a full-resolution gradient of ``bn_out``."""

    @staticmethod
    def forward(ctx: Any, bn_out: torch.Tensor, xhat: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(xhat, gamma, beta, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(bn_out, weight, bias, 1, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, gamma, beta, weight = ctx.saved_tensors
        g_xhat, grad_b = one_channel_weight_grad(grad_out, xhat, ctx.has_bias)
        g_one = box_sums(grad_out).unsqueeze(1).to(g_xhat.dtype)  # (O, 1, 3, 3, 3)
        grad_w = g_xhat * gamma.reshape(()) + g_one * beta.reshape(())
        grad_gamma = (weight * g_xhat).sum().reshape(1)
        grad_beta = (weight * g_one).sum().reshape(1)
        return None, None, grad_gamma, grad_beta, grad_w, grad_b


def _input_norm_conv_applies(bn: nn.Module, conv: nn.Module, x: torch.Tensor) -> bool:
    return (isinstance(bn, nn.BatchNorm3d) and isinstance(conv, nn.Conv3d) and bn.training
            and bn.track_running_stats and bn.affine and x.dim() == 5 and x.shape[1] == 1
            and not x.requires_grad and bn.weight.requires_grad and conv.weight.requires_grad
            and conv.in_channels == 1 and conv.groups == 1 and conv.padding_mode == "zeros"
            and tuple(conv.kernel_size) == (3, 3, 3) and tuple(conv.padding) == (1, 1, 1)
            and tuple(conv.stride) == (1, 1, 1) and tuple(conv.dilation) == (1, 1, 1)
            and _fp32_cpu_training(x, conv.weight, bn.weight))


def input_norm_conv(bn: nn.BatchNorm3d, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(bn(x))`` in training, with the same forward values and running statistics as the two modules
    (the BatchNorm output is ``F.batch_norm`` exactly as ``nn.BatchNorm3d.forward`` calls it) and the
    backward of :class:`_InputNormConv`. Falls back to ``conv(bn(x))`` where that does not apply."""
    if not _input_norm_conv_applies(bn, conv, x):
        return conv(bn(x))
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    with torch.no_grad():
        bn_out = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)
        xhat = F.batch_norm(x, None, None, None, None, True, 0.0, bn.eps)
    return _InputNormConv.apply(bn_out, xhat, bn.weight, bn.bias, conv.weight, conv.bias)


def _pool_then_relu(block: nn.Module, conv2_out: torch.Tensor) -> torch.Tensor:
    """A LunaBlock's ``maxpool(relu2(x))`` as ``relu2(maxpool(x))``: the same values (max and ReLU commute, both
    monotone) and the same gradient (where a window's max is positive it is the same element; where it is not,
    ReLU's gradient is 0 either way), with ReLU's forward and backward on an eighth of the voxels."""
    return block.relu2(block.maxpool(conv2_out))


class _FastLunaModel(LunaModel):
    """LunaModel whose fp32 CPU training forward routes the tail BatchNorm and block1.conv1 through
    :func:`input_norm_conv` and pools before each block's second ReLU (:func:`_pool_then_relu`); the same
    values as ``LunaModel.forward`` (tests compare the two), and exactly ``LunaModel.forward`` in every other
    case."""

    def forward(self, input_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block1 = self.block1
        if not _input_norm_conv_applies(self.tail_batchnorm, block1.conv1, input_batch):
            return super().forward(input_batch)
        block_out = input_norm_conv(self.tail_batchnorm, block1.conv1, input_batch)
        block_out = block1.relu1(block_out)
        block_out = _pool_then_relu(block1, block1.conv2(block_out))
        for block in (self.block2, self.block3, self.block4):
            block_out = block.relu1(block.conv1(block_out))
            block_out = _pool_then_relu(block, block.conv2(block_out))
        conv_flat = block_out.reshape(block_out.size(0), -1)
        linear_output = self.head_linear(conv_flat)
        return linear_output, self.head_softmax(linear_output)


def speed_up_training(model: nn.Module) -> str:
    """Switch a LunaModel (in place: same object, parameters, state dict keys and optimizer) to the faster
    fp32 CPU backward: every ``nn.Conv3d`` with depth padding and more than one input channel becomes a
    :class:`DepthPaddedConv3d`, and the model routes tail BatchNorm + block1.conv1 through
    :func:`input_norm_conv` and applies each block's second ReLU after its max-pool
    (:func:`_pool_then_relu`). Eval, no_grad, autocast and CUDA run the plain code. Returns a log line.
    ~1.4x on the training step (2-core AVX2 box, other levers on), of which the pooling order ~1.03x.

    Apply to the model itself, before wrapping it (DistributedDataParallel); a deep copy (EMA) keeps the
    classes, which behave as the plain ones in eval. :func:`restore_training` undoes it."""
    n_conv = 0
    for module in model.modules():
        if (type(module) is nn.Conv3d and isinstance(module.padding, tuple) and module.padding[0] > 0
                and module.in_channels > 1):  # 1 input channel: im2col is small, the GEMM path measured faster
            module.__class__ = DepthPaddedConv3d
            n_conv += 1
    fused = False
    if type(model) is LunaModel:
        model.__class__ = _FastLunaModel
        fused = True
    return (f"cpu speed: depth-padded weight gradients in {n_conv} conv(s)"
            + (", tail BatchNorm + block1.conv1 backward via the normalised input, each block's second ReLU after "
               "its max-pool" if fused else ""))


def restore_training(model: nn.Module) -> None:
    """Undo :func:`speed_up_training` (plain nn.Conv3d and LunaModel classes again)."""
    for module in model.modules():
        if type(module) is DepthPaddedConv3d:
            module.__class__ = nn.Conv3d
    if type(model) is _FastLunaModel:
        model.__class__ = LunaModel


# ----------------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------------

def affine_grid_3d(theta: torch.Tensor, size: list[int] | torch.Size) -> torch.Tensor:
    """``F.affine_grid(theta, size, align_corners=False)`` for 5-D ``size`` (N, C, D, H, W), computed as
    ``theta[:, :, 0] x + theta[:, :, 1] y + theta[:, :, 3]`` (one (N, 1, H, W, 3) plane) plus
    ``theta[:, :, 2] z`` broadcast over depth, instead of building an (N, D, H, W, 4) base grid and a
    batched matmul: ~40 ms less per batch of 32 crops on 2 cores, equal to ~2e-7 (fp32 rounding)."""
    n, _, d, h, w = size
    if theta.shape != (n, 3, 4):
        raise ValueError(f"theta must have shape ({n}, 3, 4) for size {list(size)}, got {tuple(theta.shape)}")

    def base(steps: int) -> torch.Tensor:  # align_corners=False: pixel centres in (-1, 1)
        return (torch.arange(steps, dtype=theta.dtype, device=theta.device) * 2 + 1) / steps - 1

    xs, ys, zs = base(w), base(h), base(d)
    t = theta.transpose(1, 2)  # (N, 4, 3): rows are the x, y, z and constant coefficients of (gx, gy, gz)
    plane = (t[:, None, None, 0] * xs[None, None, :, None] + t[:, None, None, 1] * ys[None, :, None, None]
             + t[:, None, None, 3])                                           # (N, H, W, 3)
    depth = t[:, None, 2] * zs[None, :, None]                                 # (N, D, 3)
    return plane[:, None] + depth[:, :, None, None]                           # (N, D, H, W, 3)


def _is_separable(theta: torch.Tensor) -> bool:
    """Whether (N, 3, 4) affines keep depth apart from the plane: z' depends on z alone and x', y' not on z."""
    return bool((theta[:, 2, :2] == 0).all() and (theta[:, :2, 2] == 0).all())


def resample_affine(batch: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(batch, F.affine_grid(theta, batch.shape, align_corners=False), mode="bilinear",
    padding_mode="border", align_corners=False)`` for a float (N, C, D, H, W) batch — augment_batch's
    resampling — faster on the CPU when every affine keeps depth apart from the plane (flips, offsets,
    scales and rotations about the slice axis, i.e. all of AugmentConfig's): trilinear interpolation is then
    a 2-D bilinear resampling of every slice (one 2-D grid per sample, the slices as channels: PyTorch's
    vectorised 2-D kernel) followed by linear interpolation between the two nearest resampled slices.
    Same sampling positions and border clamping; values equal to fp32 rounding (~5e-3 HU on crops of
    +-1000 HU). ~60 -> ~15 ms per batch of 32 crops on 2 AVX2 cores (the 3-D kernel is not vectorised).
    Other affines, and other devices, take the 3-D path unchanged."""
    if batch.device.type != "cpu" or batch.dim() != 5 or not _is_separable(theta):
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    n, c, d, h, w = batch.shape

    def base(steps: int) -> torch.Tensor:  # normalised pixel centres (align_corners=False)
        return (torch.arange(steps, dtype=theta.dtype, device=theta.device) * 2 + 1) / steps - 1

    xs, ys, zs = base(w), base(h), base(d)
    t = theta.transpose(1, 2)  # (N, 4, 3)
    grid = (t[:, None, None, 0, :2] * xs[None, None, :, None] + t[:, None, None, 1, :2] * ys[None, :, None, None]
            + t[:, None, None, 3, :2])                                          # (N, H, W, 2): x', y'
    planes = F.grid_sample(batch.reshape(n, c * d, h, w), grid.to(batch.dtype), mode="bilinear",
                           padding_mode="border", align_corners=False).reshape(n, c, d, h, w)
    z = t[:, 2, 2:3] * zs[None] + t[:, 3, 2:3]                                 # (N, D): z' per output slice
    iz = (((z + 1) * d - 1) / 2).clamp(0, d - 1)                               # unnormalise, border clamp
    z0 = iz.floor()
    frac = (iz - z0).to(batch.dtype)[:, None, :, None, None]
    z0 = z0.long()
    z1 = (z0 + 1).clamp(max=d - 1)
    lower = torch.gather(planes, 2, z0[:, None, :, None, None].expand(n, c, d, h, w))
    upper = torch.gather(planes, 2, z1[:, None, :, None, None].expand(n, c, d, h, w))
    return lower * (1 - frac) + upper * frac


# ----------------------------------------------------------------------------------------------------
# what this CPU runs
# ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _capture_fd(fd: int):
    """Capture what C code writes to file descriptor ``fd`` (oneDNN's verbose lines go to stdout)."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            import sys

            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        saved = os.dup(fd)
        os.dup2(tmp.fileno(), fd)
        result: dict[str, str] = {}
        try:
            yield result
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            result["text"] = tmp.read().decode(errors="replace")


def onednn_isa() -> str:
    """The ISA oneDNN dispatches to here (after ``ONEDNN_MAX_CPU_ISA``), from its verbose header, e.g.
    ``Intel AVX2`` or ``Intel AVX-512 with AVX512BW, AVX512VL, and AVX512DQ extensions``; ``unknown`` when
    the header cannot be read (it is printed once per process, so only the first call sees it)."""
    if "onednn_isa" in _state:
        return _state["onednn_isa"]
    isa = "unknown"
    if torch.backends.mkldnn.is_available():
        try:
            with _capture_fd(1) as out:
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    F.conv3d(torch.zeros(2, 8, 4, 4, 4), torch.zeros(8, 8, 3, 3, 3), padding=1)
            for line in out.get("text", "").splitlines():
                if ",isa:" in line:
                    isa = line.split(",isa:", 1)[1].strip()
                    break
        except (OSError, RuntimeError):
            pass
    _state["onednn_isa"] = isa
    return isa


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_report() -> str:
    """One log line on what this CPU runs: ATen's kernel ISA (``torch.backends.cpu.get_cpu_capability()``),
    oneDNN's, native bf16, torch threads, and the emulation variables when set."""
    capability = torch.backends.cpu.get_cpu_capability()
    names = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")
    env = " ".join(f"{k}={os.environ[k]}" for k in names if os.environ.get(k))
    return (f"cpu: ATen capability {capability}, oneDNN ISA {onednn_isa()}, native bf16 "
            f"{'yes' if cpu_has_native_bf16() else 'no'}, {torch.get_num_threads()} torch threads"
            + (f" ({env})" if env else ""))
