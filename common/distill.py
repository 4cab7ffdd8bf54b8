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


def kd_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-label distillation from another network's (or the same network's) logits, which get no gradient:
    T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (`kd_loss` with the teacher's
    distribution at temperature T). FRSKD's classifier <- self-teacher loss and CS-KD's class-wise loss."""
    return kd_loss(student_logits, F.softmax(teacher_logits.detach() / temperature, dim=1), temperature)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map of a feature map f (N, C, H, W) (Zagoruyko & Komodakis 2017): the mean over channels of
    |f|^p, flattened to (N, H*W) and scaled to unit L2 norm per sample."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention-transfer loss between two feature maps of the same spatial size (channels may differ): the mean
    over samples and positions of (phi(student) - phi(teacher))^2, phi = `attention_map`; the teacher's map gets no
    gradient. Summed over stages it is FRSKD's feature distillation L_F (as in the authors' code)."""
    return (attention_map(student, p) - attention_map(teacher.detach(), p)).pow(2).mean()


def virtual_teacher_probs(y: torch.Tensor, num_classes: int, correct_prob: float = 0.99,
                          temperature: float = 20.0) -> torch.Tensor:
    """Tf-KD's manually designed teacher (Yuan et al. 2020, Tf-KD_reg): u(k) = correct_prob for the true class and
    (1 - correct_prob) / (K - 1) for the others, softened as softmax(u / T)."""
    u = torch.full((len(y), num_classes), (1 - correct_prob) / (num_classes - 1), device=y.device)
    u[torch.arange(len(y), device=y.device), y] = correct_prob
    return F.softmax(u / temperature, dim=1)


def virtual_teacher_loss(logits: torch.Tensor, y: torch.Tensor, alpha: float = 0.1, temperature: float = 20.0,
                         multiplier: float = 100.0, correct_prob: float = 0.99) -> torch.Tensor:
    """Tf-KD_reg's objective as the authors' code computes it: (1 - alpha) CE + alpha * multiplier *
    KL(p_virtual || softmax(logits)) averaged over every (sample, class) entry (torch's KLDivLoss 'mean'); the
    student's distribution is at temperature 1, the virtual teacher's at `temperature`."""
    target = virtual_teacher_probs(y, logits.shape[1], correct_prob, temperature)
    kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum") / target.numel()
    return (1 - alpha) * F.cross_entropy(logits, y) + alpha * multiplier * kl
