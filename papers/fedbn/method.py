"""FedBN: FedAvg in which every BatchNorm layer stays local.

Each client keeps the affine parameters (weight, bias) and the running statistics (running_mean, running_var,
num_batches_tracked) of every BatchNorm layer across rounds; the server averages all other parameters
(Algorithm 1 of the paper). A client is evaluated with the global model and its own BatchNorm layers.
"""
from __future__ import annotations

from torch.nn.modules.batchnorm import _BatchNorm

from common.fl.algorithms import register_algorithm
from common.fl.personal import LocalEntries


def batchnorm_keys(model) -> set[str]:
    """State-dict keys (parameters and buffers) of every BatchNorm layer of `model`."""
    return {f"{name}.{key}" for name, module in model.named_modules() if isinstance(module, _BatchNorm)
            for key in module.state_dict()}


@register_algorithm("fedbn")
class FedBN(LocalEntries):
    def is_local(self, model, key):
        if not hasattr(self, "_bn_keys"):
            self._bn_keys = batchnorm_keys(model)
        return key in self._bn_keys
