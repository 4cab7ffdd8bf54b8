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
def ensemble_features(models_features: list[torch.Tensor], normalise: bool = True) -> torch.Tensor:
    """Feature-regression target of an ensemble (FedReID's server distillation): the mean of the members'
    features, each row L2-normalised first when `normalise` (the authors' `--regularization`)."""
    feats = [F.normalize(f, p=2, dim=1) if normalise else f for f in models_features]
    return torch.stack(feats).mean(0)


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


# --- feature-map distillation (FSP; KD-SVD / KD-EID of Lee, Kim, Song, ECCV 2018 and Lee, Song, TNNLS) ---------------

def fsp_matrix(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure (Yim et al. 2017) between two feature maps (B, C1, *S1) and (B, C2, *S2): the
    (B, C1, C2) matrix G_ij = sum_s top_i(s) bottom_j(s) / |S2|; a larger `top` is max-pooled to bottom's size first
    (2x2 max-pooling in the authors' code, for maps that halve)."""
    if top.shape[2:] != bottom.shape[2:]:
        pool = F.adaptive_max_pool1d if top.dim() == 3 else F.adaptive_max_pool2d
        top = pool(top, bottom.shape[2:])
    a, b = top.flatten(2), bottom.flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def fsp_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive pairs of feature points of the batch mean of ||G_T - G_S||_F^2 / 2 (the teacher's FSP
    matrices are constants)."""
    total = 0.0
    for i in range(len(student_feats) - 1):
        gs = fsp_matrix(student_feats[i], student_feats[i + 1])
        gt = fsp_matrix(teacher_feats[i], teacher_feats[i + 1]).detach()
        total = total + ((gt - gs) ** 2).sum((1, 2)).mul(0.5).mean()
    return total


def _zero_nonfinite_samples(grad: torch.Tensor) -> torch.Tensor:
    """A gradient with the samples whose gradient is not finite (equal singular values) set to zero."""
    ok = torch.isfinite(grad).flatten(1).all(1).view(-1, *([1] * (grad.dim() - 1)))
    return torch.where(ok, grad, torch.zeros_like(grad))


def feature_matrix(fm: torch.Tensor) -> torch.Tensor:
    """A feature map (B, C, *S) as the (B, |S|, C) matrices the decomposition reads (rows: positions, columns:
    channels)."""
    return fm.flatten(2).transpose(1, 2)


def truncated_decomposition(fm: torch.Tensor, k: int, method: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k right singular vectors V (B, C, k) of each sample's feature matrix X (|S| x C) and its top-k
    singular values, L2-normalised over the k (B, k). `svd`: torch.linalg.svd of X. `eid` (KD-EID): the same
    vectors from an eigen-decomposition when X is far from square (|S|/C outside (2/3, 3/2)): of X^T X (C x C) when
    |S| >= C, v_i its eigenvectors; of X X^T (|S| x |S|) when |S| < C, v_i = X^T u_i / ||X^T u_i||; the singular
    values are the norms ||X v_i||, ||X^T u_i||. A singular vector's sign is arbitrary (it differs between LAPACK
    routines, so between the two decompositions); each is returned with a non-negative sum of entries (for the top
    vector of a non-negative feature map: all entries >= 0), so both give the same vectors. Gradients of samples where the decomposition's gradient is not
    finite (repeated singular values) are set to zero, as the authors' code does."""
    x = feature_matrix(fm)
    if x.requires_grad:
        x.register_hook(_zero_nonfinite_samples)
    n, d = x.shape[1], x.shape[2]
    k = min(k, n, d)
    if method == "svd" or (method == "eid" and 2 / 3 < n / d < 3 / 2):
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        s, v = s[:, :k], vh.transpose(1, 2)[:, :, :k]
    elif method == "eid":
        if n < d:
            _, u = torch.linalg.eigh(x @ x.transpose(1, 2))
            v = x.transpose(1, 2) @ u.flip(-1)[:, :, :k]  # eigh: ascending eigenvalues
            s = v.norm(dim=1)
            v = torch.nan_to_num(v / s.unsqueeze(1))  # a zero singular value: a zero vector (the authors' removenan)
        else:
            _, v = torch.linalg.eigh(x.transpose(1, 2) @ x)
            v = v.flip(-1)[:, :, :k]
            s = (x @ v).norm(dim=1)
    else:
        raise ValueError(f"decomposition must be 'svd' or 'eid', got {method!r}")
    v = F.normalize(v, dim=1)
    sign = torch.where(v.sum(1, keepdim=True) < 0, -1.0, 1.0).to(v.dtype)  # each vector's sign is free: fix it
    return F.normalize(s, dim=1), v * sign


def align_singular_vectors(v_student: torch.Tensor, v_teacher: torch.Tensor) -> torch.Tensor:
    """For each teacher vector (columns of (B, C, kt)), the student vector (of (B, C, ks)) with the largest |cosine|
    to it, its sign flipped where that cosine is negative: (B, C, kt), column j matched to teacher vector j."""
    cos = v_student.transpose(1, 2) @ v_teacher  # (B, ks, kt)
    best = cos.abs().argmax(1, keepdim=True)  # (B, 1, kt)
    mask = torch.zeros_like(cos).scatter(1, best, torch.gather(cos, 1, best).sign())
    return v_student @ mask


def rbf_correlation(v_a: torch.Tensor, v_b: torch.Tensor, bandwidth: float = 8.0) -> torch.Tensor:
    """Radial-basis correlation of the compressed features of two layers, (B, Ca, k) and (B, Cb, k):
    exp(-(v_a[c, i] - v_b[c', i])^2 / bandwidth) for every channel pair (c, c') and vector i: (B, Ca, Cb, k)."""
    return torch.exp(-(v_a.unsqueeze(2) - v_b.unsqueeze(1)) ** 2 / bandwidth)


def kd_svd_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], k: int = 1,
                student_k: int | None = None, method: str = "svd", bandwidth: float = 8.0) -> torch.Tensor:
    """KD-SVD (Lee, Kim, Song 2018) / KD-EID (Lee, Song): each feature map compressed to its top singular vectors
    (teacher k, student `student_k`, default k + 3), the student's aligned to the teacher's by order and sign, both
    weighted by the teacher's normalised singular values; the knowledge is the radial-basis correlation between
    consecutive feature points, matched by the sum of squared differences (the teacher's a constant; non-finite
    terms dropped). Student and teacher feature maps must have the same channels at each point."""
    student_k = k + 3 if student_k is None else student_k
    total, prev = 0.0, None
    for sf, tf_ in zip(student_feats, teacher_feats):
        if sf.shape[1] != tf_.shape[1]:
            raise ValueError(f"KD-SVD compares singular vectors over channels: student {sf.shape[1]} and teacher "
                             f"{tf_.shape[1]} channels differ at a feature point")
        with torch.no_grad():
            s_t, v_t = truncated_decomposition(tf_, k, method)
        _, v_s = truncated_decomposition(sf, student_k, method)
        v_s = align_singular_vectors(v_s, v_t)
        w = s_t.unsqueeze(1)
        v_t, v_s = v_t * w, v_s * w
        if prev is not None:
            diff = (rbf_correlation(v_s, prev[0], bandwidth) - rbf_correlation(v_t, prev[1], bandwidth)) ** 2
            total = total + torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff)).sum()
        prev = (v_s, v_t)
    return total


def kd_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   teacher_eps: float = 0.0) -> torch.Tensor:
    """Soft-label distillation from another network's (or the same network's) logits, which get no gradient:
    T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (`kd_loss` with the teacher's
    distribution at temperature T). FRSKD's classifier <- self-teacher loss and CS-KD's class-wise loss.
    `teacher_eps` is added to every teacher probability (not renormalised), as FedGKT's code does (1e-7)."""
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return kd_loss(student_logits, teacher + teacher_eps if teacher_eps else teacher, temperature)


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
