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


def log_ensemble_probs(models_logits: list[torch.Tensor]) -> torch.Tensor:
    """log of the ensemble's predictive distribution at T = 1, the mean of the members' softmaxes (Stanton et al.
    2021's teacher ensemble), computed stably: logsumexp of the members' log-softmaxes minus log(members)."""
    stacked = torch.stack([F.log_softmax(z.float(), dim=1) for z in models_logits])
    return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(models_logits))))


def top1_agreement(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Fidelity metric of Stanton et al. (2021): the fraction of inputs on which the student's top-1 class equals
    the teacher's, (1/n) sum 1[argmax_j p_t(j|x_i) = argmax_j p_s(j|x_i)]; `teacher` and `student` are (n, classes)
    logits, probabilities or log-probabilities (argmax is the same)."""
    return (teacher.argmax(1) == student.argmax(1)).double().mean().item()


def predictive_kl(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> float:
    """Fidelity metric of Stanton et al. (2021): the mean over inputs of KL(p_t(.|x_i) || p_s(.|x_i)) in nats,
    from (n, classes) log-probabilities of teacher and student at temperature 1."""
    p_t = teacher_log_probs.exp()
    terms = torch.where(p_t > 0, p_t * (teacher_log_probs - student_log_probs), torch.zeros_like(p_t))  # 0 log 0 = 0
    kl = terms.sum(1)
    return kl.double().mean().item()
