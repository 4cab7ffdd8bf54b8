"""Knowledge-distillation losses shared by the distillation papers."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0,
            t_squared: bool = True) -> torch.Tensor:
    """KL(teacher || softmax(student / T)) per sample, averaged over the batch; times T^2 when `t_squared`
    (Hinton et al. 2015, the default). FedDF's code divides by T but does not multiply by T^2 (`t_squared=False`)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    loss = F.kl_div(log_p, teacher_probs, reduction="batchmean")
    return loss * temperature ** 2 if t_squared else loss


@torch.no_grad()
def ensemble_probs(models_logits: list[torch.Tensor], temperature: float = 1.0, average: str = "logits") -> torch.Tensor:
    """Teacher distribution of an ensemble: softmax of the mean logits, or the mean of the softmaxes."""
    stacked = torch.stack(models_logits)
    if average == "logits":
        return F.softmax(stacked.mean(0) / temperature, dim=1)
    if average == "probs":
        return F.softmax(stacked / temperature, dim=2).mean(0)
    raise ValueError(f"average must be 'logits' or 'probs', got {average!r}")


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
