"""Compute and size of a model, counted from the model itself: FLOPs of one forward pass per sample (torch's
`torch.utils.flop_counter.FlopCounterMode`: 2 FLOPs per multiply-accumulate of convolutions and matrix products;
norms, activations and pooling are not counted) and its number of parameters.

A model may say which part of it a client runs (`model.client_model()`, e.g. the edge half of a split network);
`client_compute` counts that part (the whole model otherwise).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of `module` on one sample of `input_shape` (no batch dimension), in eval mode;
    the module's mode and the global RNG are left as they were."""
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            return counted_flops(lambda: module(torch.zeros((1, *input_shape), device=device)))
    finally:
        module.train(was_training)


def counted_flops(work, devices: tuple = ()) -> int:
    """FLOPs of the operations `work()` runs (FlopCounterMode), the global RNG (and that of `devices`) left as it was."""
    with torch.random.fork_rng(devices=list(devices)), FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def client_compute(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """{"flops": forward FLOPs per sample, "parameters": count} of the part of `model` a client runs."""
    part = model.client_model() if hasattr(model, "client_model") else model
    return {"flops": forward_flops(part, input_shape), "parameters": parameter_count(part)}
