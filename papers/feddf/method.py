"""FedDF's server-side model fusion: FedAvg, then distil the ensemble of client models into the average.

Algorithm 1 of the paper: initialise the fused model with the sample-weighted average of the received client
models, then minimise KL(sigma(mean_k f(x_k, d)) || sigma(f(x, d))) over batches d of unlabeled server data
with Adam and cosine annealing, keeping the best model on a held-out validation split (early stopping).
"""
from __future__ import annotations

import torch

from common.data import load_dataset
from common.distill import ensemble_probs, kd_loss, predict_logits
from common.fl.algorithms import Algorithm, State, register_algorithm
from common.fl.engine import clone_state, sub_seed


@torch.no_grad()
def mean_kd_loss(model: torch.nn.Module, x: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    return kd_loss(predict_logits(model, x), teacher, temperature).item()


def distill(student: torch.nn.Module, x: torch.Tensor, teacher: torch.Tensor, x_val: torch.Tensor,
            teacher_val: torch.Tensor, *, steps: int, batch_size: int, lr: float, patience: int, eval_every: int,
            temperature: float, generator: torch.Generator) -> dict:
    """Distil `teacher` probabilities into `student` in place; returns what happened (for the results file)."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    best = start = mean_kd_loss(student, x_val, teacher_val, temperature)
    best_state, since_best, step = clone_state(student), 0, 0
    while step < steps and since_best < patience:
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            b = perm[i:i + batch_size]
            student.train()
            loss = kd_loss(student(x[b]), teacher[b], temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % eval_every == 0:
                val = mean_kd_loss(student, x_val, teacher_val, temperature)
                if val < best:
                    best, best_state, since_best = val, clone_state(student), 0
                else:
                    since_best += eval_every
            if step >= steps or since_best >= patience:
                break
    student.load_state_dict(best_state)
    return {"steps": step, "val_kl_before": start, "val_kl_after": best}


@register_algorithm("feddf")
class FedDF(Algorithm):
    transient = Algorithm.transient + ("x_train", "x_val", "teacher_model")
    def __init__(self, unlabeled: str = "cifar100", steps: int = 10_000, batch_size: int = 128, lr: float = 1e-3,
                 patience: int = 1_000, eval_every: int = 100, val_fraction: float = 0.2, temperature: float = 1.0,
                 ensemble: str = "logits", unlabeled_limit: int | None = None):
        super().__init__()
        self.unlabeled, self.steps, self.batch_size, self.lr = unlabeled, steps, batch_size, lr
        self.patience, self.eval_every, self.val_fraction = patience, eval_every, val_fraction
        self.temperature, self.ensemble, self.unlabeled_limit = temperature, ensemble, unlabeled_limit

    def setup(self, ctx):
        super().setup(ctx)
        # Only the images are used: the server has no labels for its distillation data.
        ds = load_dataset(self.unlabeled, ctx.data_root, train_limit=self.unlabeled_limit)
        x = ds.train.x
        if x.shape[1:] != ctx.data.input_shape:
            raise ValueError(f"unlabeled data {self.unlabeled} has shape {tuple(x.shape[1:])}, "
                             f"clients' data {ctx.data.input_shape}")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(sub_seed(ctx.spec["seed"], 0xD15)))
        n_val = int(len(x) * self.val_fraction)
        self.x_val, self.x_train = x[perm[:n_val]].to(ctx.device), x[perm[n_val:]].to(ctx.device)
        self.teacher_model = ctx.make_model()

    def teacher(self, client_states: list[State]) -> tuple[torch.Tensor, torch.Tensor]:
        logits_train, logits_val = [], []
        for state in client_states:
            self.teacher_model.load_state_dict(state)
            logits_train.append(predict_logits(self.teacher_model, self.x_train))
            logits_val.append(predict_logits(self.teacher_model, self.x_val))
        return (ensemble_probs(logits_train, self.temperature, self.ensemble),
                ensemble_probs(logits_val, self.temperature, self.ensemble))

    def server_update(self, global_state, client_states, weights, round_index):
        fused = super().server_update(global_state, client_states, weights, round_index)
        t_train, t_val = self.teacher(client_states)
        student = self.ctx.model
        student.load_state_dict(fused)
        gen = torch.Generator().manual_seed(sub_seed(self.ctx.spec["seed"], round_index, 0xD15))
        info = distill(student, self.x_train, t_train, self.x_val, t_val, steps=self.steps,
                       batch_size=self.batch_size, lr=self.lr, patience=self.patience, eval_every=self.eval_every,
                       temperature=self.temperature, generator=gen)
        for k, v in info.items():
            self.ctx.history.log(f"distill_{k}", v)
        return clone_state(student)
