"""The training recipe around the book's model, as pure functions of the settings and the step: the learning
rate (warm-up, constant or cosine), the optimizer, the weight average (EMA) and the augmentation settings. Pure
so a resumed run continues exactly where it stopped (docs/design.md)."""

from __future__ import annotations

import argparse
import math

import torch

from luna.data import NO_AUGMENTATION, AugmentConfig


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_steps``.

    A pure function of the global step, so a resumed run continues the schedule exactly."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return lr
    return lr * (step + 1) / warmup_steps


def scheduled_lr(lr: float, step: int, warmup_steps: int, schedule: str = "constant", total_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): the linear warm-up, then ``constant`` (the book) or
    ``cosine``: from ``lr`` down to 0 at ``total_steps`` along half a cosine. A pure function of the step (and,
    for cosine, of the run's length), so a resumed run continues the schedule exactly."""
    rate = warmup_lr(lr, step, warmup_steps)
    if schedule == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, max(0.0, (step - warmup_steps) / (total_steps - warmup_steps)))
        rate *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return rate


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The book's SGD (lr, momentum), Adam or AdamW (lr, torch's default betas).

    ``weight_decay`` (default 0, the book) applies to the conv and linear weights only, not to biases or
    BatchNorm's scale and shift (as torchvision's ``--norm-weight-decay 0``): for sgd and adam it is the L2
    term added to the gradient, for adamw the decoupled decay ``w <- w - lr * weight_decay * w``."""
    weight_decay = float(args.weight_decay)
    params: object = model.parameters()
    if weight_decay > 0:
        decayed = [p for p in model.parameters() if p.ndim > 1]
        rest = [p for p in model.parameters() if p.ndim <= 1]
        params = [{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=weight_decay)


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay for optimizer step ``step`` (0-based): ``decay``, lowered early on as
    ``(1 + step) / (10 + step)`` so the average forgets the random init within the first epoch."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter and floating buffer (batch-norm
    statistics); integer buffers (batch counts) are copied."""
    pairs = list(zip(ema.parameters(), model.parameters())) + list(zip(ema.buffers(), model.buffers()))
    floats = [(e, m) for e, m in pairs if e.is_floating_point()]
    if floats:
        torch._foreach_lerp_([e for e, _ in floats], [m.detach() for _, m in floats], 1.0 - decay)
    for e, m in pairs:
        if not e.is_floating_point():
            e.copy_(m)


def augment_config(args: argparse.Namespace, epoch: int | None = None) -> AugmentConfig:
    """The run's augmentation (``--augment-*``), or that of training epoch ``epoch``: the same but flips only in
    the last ``--augment-flip-only-epochs`` of ``--epochs`` (the model ends on crops as they are predicted)."""
    if not args.augment:
        return NO_AUGMENTATION
    config = AugmentConfig(flip=args.augment_flip, offset=args.augment_offset, scale=args.augment_scale,
                           rotate=args.augment_rotate, noise_hu=args.augment_noise)
    if epoch is not None and epoch > args.epochs - args.augment_flip_only_epochs:
        return config.flips_only()
    return config
