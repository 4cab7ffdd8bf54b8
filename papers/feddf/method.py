"""FedDF's server-side model fusion: FedAvg, then distil the ensemble of client models into the average.

Algorithm 1 of the paper, as the authors' code runs it (epfml/federated-learning-public-code, codes/FedDF-code,
`pcode/aggregation/noise_knowledge_transfer.py`, class NoiseKTSolver, with the README's FedDF command line):
initialise the fused model with the average of the received client models, then minimise
KL(sigma(mean_k f(x_k, d) / T) || sigma(f(x, d) / T)) over batches d of unlabeled server data with Adam (lr 1e-3),
cosine annealing over the step budget and the gradient norm clipped at 5. Every `eval_every` steps the student's
top-1 accuracy on a labelled validation split (held out from the training data, which the clients never see) is
measured; the best such checkpoint is kept and distillation stops once `patience` steps passed without a strict
improvement. The returned model is that best *distilled* checkpoint: the undistilled average is never returned,
even where its validation accuracy was higher (the authors' `return_best_model_on_val` is off).
"""
from __future__ import annotations

import torch

from common.data import load_dataset
from common.distill import ensemble_probs, kd_loss, predict_logits
from common.fl.algorithms import Algorithm, State, register_algorithm
from common.fl.engine import clone_state, evaluate, sub_seed

CLIP_NORM = 5.0  # authors: torch.nn.utils.clip_grad_norm_(student.parameters(), 5) before every student step


def teacher_probs(logits: list[torch.Tensor], temperature: float, ensemble: str) -> torch.Tensor:
    """The ensemble's target distribution, as the authors form it: `logits` (avg_logits) is
    softmax(mean of the clients' logits / T); `probs` (avg_probs) is the mean of the clients' softmaxes at T = 1
    (the temperature is applied to the student only)."""
    return ensemble_probs(logits, temperature if ensemble == "logits" else 1.0, ensemble)


def feddf_loss(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || softmax(student / T)), batch mean, not multiplied by T^2 (the authors' `divergence`)."""
    return kd_loss(student_logits, teacher, temperature, t_squared=False)


@torch.no_grad()
def mean_kd_loss(model: torch.nn.Module, x: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    return feddf_loss(predict_logits(model, x), teacher, temperature).item()


def distill(student: torch.nn.Module, x: torch.Tensor, teacher: torch.Tensor, x_val: torch.Tensor,
            y_val: torch.Tensor, *, steps: int, batch_size: int, lr: float, patience: int, eval_every: int,
            temperature: float, generator: torch.Generator, clip_norm: float = CLIP_NORM,
            on_eval=None) -> dict:
    """Distil `teacher` probabilities on `x` into `student` in place; returns what happened (for the results file).

    Early stopping as in the authors' NoiseKTSolver.distillation / BaseKTSolver.check_early_stopping: after every
    `eval_every`-th step (and after the last step, should the budget not be a multiple of it) the student's top-1
    accuracy on (x_val, y_val) is measured; a strictly better accuracy makes that checkpoint the best one; the loop
    stops when `patience` steps have passed since the best checkpoint. The undistilled start is not a candidate.
    `on_eval(step, accuracy, student)` is called at every evaluation (for tests)."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    best_acc, best_state, best_step, step, stop = None, None, 0, 0, False
    while step < steps and not stop:
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        # The authors' loader keeps the last, smaller batch of an epoch (drop_last=False); a single sample is
        # skipped here because BatchNorm cannot train on a batch of one.
        for b in (perm[i:i + batch_size] for i in range(0, len(x), batch_size)):
            if len(b) < 2:
                continue
            student.train()
            loss = feddf_loss(student(x[b]), teacher[b], temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), clip_norm)
            opt.step()
            sched.step()
            step += 1
            if step % eval_every == 0 or step == steps:
                acc, _ = evaluate(student, x_val, y_val)
                if on_eval is not None:
                    on_eval(step, acc, student)
                if best_acc is None or acc > best_acc:
                    best_acc, best_state, best_step = acc, clone_state(student), step
                stop = step - best_step >= patience
            if stop or step >= steps:
                break
    if best_state is None:  # no step was taken (no unlabeled batch): nothing to distil
        return {"steps": 0, "best_step": 0, "val_accuracy": None}
    student.load_state_dict(best_state)
    return {"steps": step, "best_step": best_step, "val_accuracy": best_acc}


def holdout_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """The validation split: a seeded random `fraction` of the n training indices (sorted), the same for every
    FedDF run with this seed and training set."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(sub_seed(seed, 0x7A1)))
    return torch.sort(perm[:int(n * fraction)]).values


@register_algorithm("feddf")
class FedDF(Algorithm):
    transient = Algorithm.transient + ("x_unlabeled", "x_val", "y_val", "teacher_model")

    def __init__(self, unlabeled: str = "cifar100", steps: int = 10_000, batch_size: int = 64, lr: float = 1e-3,
                 patience: int = 1_000, eval_every: int = 100, val_fraction: float = 0.1, temperature: float = 1.0,
                 ensemble: str = "logits", unlabeled_limit: int | None = None, clip_norm: float = CLIP_NORM):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1): FedDF's early stopping needs a labelled "
                             f"validation split, got {val_fraction}")
        if ensemble not in ("logits", "probs"):
            raise ValueError(f"ensemble must be 'logits' or 'probs', got {ensemble!r}")
        self.unlabeled, self.steps, self.batch_size, self.lr = unlabeled, steps, batch_size, lr
        self.patience, self.eval_every, self.val_fraction = patience, eval_every, val_fraction
        self.temperature, self.ensemble, self.unlabeled_limit = temperature, ensemble, unlabeled_limit
        self.clip_norm = clip_norm

    def setup(self, ctx):
        super().setup(ctx)
        # Labelled validation split for early stopping, as in the authors' code (define_val_dataset with
        # --val_data_ratio 0.1): held out of the training set, so no client trains on it. The authors split before
        # partitioning; here the clients' index sets are already drawn, so the held-out samples are removed from
        # them (in place: the results file's client sizes and partition fingerprint show the reduced sets).
        train = ctx.data.train
        val = holdout_indices(len(train.y), self.val_fraction, ctx.spec["seed"])
        held = torch.zeros(len(train.y), dtype=torch.bool)
        held[val] = True
        ctx.parts[:] = [p[~held[p]] for p in ctx.parts]
        self.x_val, self.y_val = train.x[val].to(ctx.device), train.y[val].to(ctx.device)
        # Only the images of the unlabeled set are used (all of them, as the authors' data_percentage=1.0).
        ds = load_dataset(self.unlabeled, ctx.data_root, train_limit=self.unlabeled_limit)
        x = ds.train.x
        if x.shape[1:] != ctx.data.input_shape:
            raise ValueError(f"unlabeled data {self.unlabeled} has shape {tuple(x.shape[1:])}, "
                             f"clients' data {ctx.data.input_shape}")
        self.x_unlabeled = x.to(ctx.device)
        self.teacher_model = ctx.make_model()

    def teacher(self, client_states: list[State]) -> torch.Tensor:
        """The ensemble's target on every unlabeled image (the client models in eval mode, uniformly weighted)."""
        logits = []
        for state in client_states:
            self.teacher_model.load_state_dict(state)
            logits.append(predict_logits(self.teacher_model, self.x_unlabeled))
        return teacher_probs(logits, self.temperature, self.ensemble)

    def server_update(self, global_state, client_states, weights, round_index):
        fused = super().server_update(global_state, client_states, weights, round_index)
        target = self.teacher(client_states)
        student = self.ctx.model
        student.load_state_dict(fused)
        logits_before = predict_logits(student, self.x_unlabeled)
        acc_before, _ = evaluate(student, self.x_val, self.y_val)
        gen = torch.Generator().manual_seed(sub_seed(self.ctx.spec["seed"], round_index, 0xD15))
        info = distill(student, self.x_unlabeled, target, self.x_val, self.y_val, steps=self.steps,
                       batch_size=self.batch_size, lr=self.lr, patience=self.patience, eval_every=self.eval_every,
                       temperature=self.temperature, generator=gen, clip_norm=self.clip_norm)
        new = clone_state(student)
        logits_after = predict_logits(student, self.x_unlabeled)
        log = self.ctx.history.log
        log("distill_steps", info["steps"])              # student steps taken (early stopping may end it early)
        log("distill_best_step", info["best_step"])      # step of the returned checkpoint (0: none taken)
        log("distill_changed", int(any(not torch.equal(new[k], fused[k]) for k in fused)))
        log("distill_val_acc_before", acc_before)        # the average's top-1 accuracy on the validation split
        log("distill_val_acc_after", info["val_accuracy"] if info["steps"] else acc_before)
        log("distill_kl_before", feddf_loss(logits_before, target, self.temperature).item())
        log("distill_kl_after", feddf_loss(logits_after, target, self.temperature).item())
        log("distill_pred_changed", (logits_before.argmax(1) != logits_after.argmax(1)).float().mean().item())
        return new
