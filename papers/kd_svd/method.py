"""KD-SVD (Lee, Kim, Song, ECCV 2018), KD-EID (Lee, Song, TNNLS) and the baselines they are compared with (Hinton's
soft logits, FSP), as one centralised run of the shared engine (common/fl/engine.py), like papers/kd_fidelity.

Method `kd_svd` trains, in one run and one loop:
1. rounds 0 .. teacher_rounds-1: the teacher (`teacher_model`, e.g. the deep network of the same stage widths),
   with cross-entropy on the labels. It starts from the weights the run's seed gives that model and sees the
   batches of the centralised run of it, so it is bit-for-bit the teacher of the table's Teacher row (method
   `kd_svd` with no student rounds), in every run of a seed;
2. with `distill: fsp`, `init_rounds` rounds in which the student learns the teacher's FSP matrices alone (the
   first stage of Yim et al.'s two-stage training, as in the authors' benchmark code), with its own optimiser state;
3. the remaining rounds: the student (the run's model), from the initialisation and with the batches and
   learning-rate schedule of the Student row (the student trained alone), with the loss of `distill`:
   - `none` / `fsp`: cross-entropy (after FSP's initialisation stage);
   - `kd`: (1 - kd_alpha) cross-entropy + kd_alpha KL(teacher || student) at temperature kd_temperature, without
     the T^2 factor (the authors' benchmark: 0.7, 0.3, T = 4);
   - `svd` / `eid`: cross-entropy plus the KD-SVD / KD-EID loss between the stage outputs of student and teacher
     (common/distill.py: kd_svd_loss). As in the authors' code, the distillation gradient of every parameter
     tensor is clipped to the norm of its cross-entropy gradient times sigmoid(epoch) (`clip`), epoch counting the
     student's epochs from 0.

Logged after every round: the test accuracy of the network training in that round (the teacher's during the
teacher rounds), `phase` (teacher / init / student) and the teacher's final test accuracy (`teacher_accuracy`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.distill import fsp_loss, kd_loss, kd_svd_loss
from common.errors import SuiteError
from common.fl.algorithms import Centralised, register_algorithm
from common.fl.engine import clone_state
from common.models import build_model, stage_maps

DISTILL = ("none", "kd", "fsp", "svd", "eid")


def clipped_gradient_loss(model: torch.nn.Module, task: torch.Tensor, distill: torch.Tensor,
                          factor: float) -> torch.Tensor:
    """A loss whose value is task + distill and whose gradient, per parameter tensor, is g_task + clip(g_distill,
    ||g_task|| * factor) (tf.clip_by_norm: scaled down to that norm when longer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g_task = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
    g_dist = torch.autograd.grad(distill, params, allow_unused=True)
    surrogate = 0.0
    for p, gt, gd in zip(params, g_task, g_dist):
        g = torch.zeros_like(p) if gt is None else gt
        if gd is not None:
            limit = g.norm() * factor
            norm = gd.norm()
            g = g + (gd * (limit / norm) if norm > limit else gd)
        surrogate = surrogate + (p * g.detach()).sum()
    return surrogate - surrogate.detach() + (task + distill).detach()


@register_algorithm("kd_svd")
class KDSVD(Centralised):
    transient = (*Centralised.transient, "teacher_model", "student_model")

    def __init__(self, distill: str = "svd", teacher_model: dict | None = None, teacher_rounds: int = 0,
                 init_rounds: int = 0, k: int = 1, student_k: int | None = None, bandwidth: float = 8.0,
                 clip: bool = True, kd_temperature: float = 4.0, kd_alpha: float = 0.3, fsp_weight: float = 1e-3,
                 server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if distill not in DISTILL:
            raise SuiteError(f"kd_svd: unknown distill '{distill}'; use one of {', '.join(DISTILL)}")
        if distill != "none" and (teacher_model is None or teacher_rounds < 1):
            raise SuiteError(f"kd_svd: distill '{distill}' needs a teacher_model and teacher_rounds >= 1")
        if init_rounds and distill != "fsp":
            raise SuiteError("kd_svd: init_rounds (FSP's initialisation stage) needs distill 'fsp'")
        if k < 1 or (student_k is not None and student_k < k):
            raise SuiteError(f"kd_svd: k must be >= 1 and student_k >= k, got k={k}, student_k={student_k}")
        self.distill, self.teacher_spec = distill, teacher_model
        self.teacher_rounds, self.init_rounds = teacher_rounds, init_rounds
        self.k, self.student_k, self.bandwidth, self.clip = k, student_k, bandwidth, clip
        self.kd_temperature, self.kd_alpha, self.fsp_weight = kd_temperature, kd_alpha, fsp_weight

    # --- set-up -------------------------------------------------------------------------------------------------
    def setup(self, ctx):
        student = getattr(ctx, "kd_student_model", None) or ctx.model  # a second set-up finds the model swapped
        ctx.kd_student_model = ctx.model = student
        super().setup(ctx)  # the pooled training data as one client
        rounds = ctx.spec["training"]["rounds"]
        self.student_rounds = rounds - self.teacher_rounds - self.init_rounds
        if self.student_rounds < 0 or (self.distill != "none" and self.student_rounds < 1):
            raise SuiteError(f"kd_svd: training.rounds ({rounds}) must cover teacher_rounds ({self.teacher_rounds}) "
                             f"and init_rounds ({self.init_rounds})" +
                             (" and at least one student round" if self.distill != "none" else ""))
        ctx.parts[:] = [ctx.parts[0]] * 2  # client 0: teacher, then student; client 1: FSP's initialisation stage
        self.student_model = student
        self.student_init = clone_state(student)  # the run's initialisation, that of the student trained alone
        self.teacher_model, self.teacher_state, self.teacher_accuracy = None, None, None
        if self.teacher_rounds:
            if self.teacher_spec is None:
                raise SuiteError("kd_svd: teacher_rounds >= 1 needs a teacher_model")
            tm = dict(self.teacher_spec)
            data = ctx.data
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.spec["seed"])  # the initialisation the centralised teacher run draws
                self.teacher_model = build_model(tm.pop("name"), in_channels=data.input_shape[0],
                                                 num_classes=data.num_classes, input_size=data.input_shape[-1],
                                                 data_root=ctx.data_root, **tm).to(ctx.device)
            self.teacher_state = clone_state(self.teacher_model)
            ctx.model = self.teacher_model  # round 0 trains the teacher: the engine's global state is the teacher's
        self.phase, self.epoch = "teacher" if self.teacher_rounds else "student", 0

    def phase_of(self, round_index: int) -> str:
        if round_index < self.teacher_rounds:
            return "teacher"
        return "init" if round_index < self.teacher_rounds + self.init_rounds else "student"

    # --- schedule ------------------------------------------------------------------------------------------------
    def clients_of_round(self, run, round_index):
        self.phase = self.phase_of(round_index)
        self.ctx.model = self.teacher_model if self.phase == "teacher" else self.student_model
        return [1] if self.phase == "init" else [0]

    def train_client(self, run, client, round_index):
        if self.phase == "teacher":
            return run.local_train(client, round_index)
        self.load_teacher()
        if self.phase == "init":
            return run.local_train(client, round_index - self.teacher_rounds)
        first = self.teacher_rounds + self.init_rounds
        if round_index == first:
            run.client_optimizers.pop(0, None)  # the teacher's optimiser state: the student starts its own
        self.epoch = round_index - first
        return run.local_train(client, self.epoch)  # the batches and learning rates of the student trained alone

    def load_teacher(self) -> None:
        if self.teacher_model is not None:
            self.teacher_model.load_state_dict(self.teacher_state)
            self.teacher_model.eval()

    def local_loss(self, model, x, y):
        if self.phase == "teacher" or (self.phase == "student" and self.distill in ("none", "fsp")):
            return super().local_loss(model, x, y)
        if self.distill == "kd":
            logits = model(x)
            with torch.no_grad():
                target = F.softmax(self.teacher_model(x) / self.kd_temperature, dim=1)
            return (1 - self.kd_alpha) * F.cross_entropy(logits, y) + \
                self.kd_alpha * kd_loss(logits, target, self.kd_temperature, t_squared=False)
        feats, logits = stage_maps(model, x)
        with torch.no_grad():
            t_feats, _ = stage_maps(self.teacher_model, x)
        if self.phase == "init":  # FSP's first stage: the teacher's FSP matrices alone
            return self.fsp_weight * fsp_loss(feats, t_feats)
        ce = F.cross_entropy(logits, y)
        dist = kd_svd_loss(feats, t_feats, self.k, self.student_k, self.distill, self.bandwidth)
        if not self.clip:
            return ce + dist
        return clipped_gradient_loss(model, ce, dist, 1 / (1 + math.exp(-self.epoch)))

    def server_update(self, global_state, client_states, weights, round_index):
        if self.phase == "teacher":
            self.teacher_state = client_states[0]
            if round_index == self.teacher_rounds - 1 and self.student_rounds + self.init_rounds > 0:
                return {k: v.clone() for k, v in self.student_init.items()}  # the student's turn
        return client_states[0]

    # --- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, run, global_state):
        from common.fl.engine import evaluate
        if self.phase == "teacher":
            self.load_teacher()
            acc, loss = evaluate(self.teacher_model, run.x_test, run.y_test)
            self.teacher_accuracy = acc
            return {"test_accuracy": acc, "test_loss": loss, "phase": "teacher", "teacher_accuracy": acc}
        self.student_model.load_state_dict(global_state)
        acc, loss = evaluate(self.student_model, run.x_test, run.y_test)
        return {"test_accuracy": acc, "test_loss": loss, "phase": self.phase, "teacher_accuracy": self.teacher_accuracy}
