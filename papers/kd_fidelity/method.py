"""Knowledge distillation and its fidelity (Stanton et al., "Does Knowledge Distillation Really Work?", NeurIPS
2021), as one centralised run of the shared engine (one model trained on the pooled data; common/fl/engine.py).

Method `kd_fidelity` trains, in the same run and the same loop:
1. rounds 0 .. teacher_rounds-1: `teachers` teacher networks, each from its own initialisation (drawn from the
   run's seed and the teacher's index, so teacher k is the same network in every run of a seed: the one-teacher run's
   teacher is the first member of the three-teacher ensemble), each trained with cross-entropy on the labels, one
   epoch per round (each teacher is a "client" holding all the training data, with its own optimiser state);
2. the remaining rounds: the student (the engine's global model) trained with the pure distillation loss (the
   paper's alpha = 0): Hinton's KL(p_t^tau || p_s^tau) * tau^2 to the teacher's predictive distribution at
   temperature tau, the ensemble's being the mean of its members' softmaxes. With `extra`, every batch of training
   inputs is joined by a batch of extra distillation inputs (no labels are used): `mixup` (convex combinations of
   two training inputs, lambda ~ U(0, 1): the paper's best augmentation), `generated` (new mnist1d signals from the
   package's generator with another seed: the analog of the paper's GAN samples) or `noise` (Gaussian noise added
   to the training inputs).

The student starts from (`init`): `random` (the run's initialisation, independent of every teacher's),
`teacher_init` (the first teacher's initial weights: the paper's Table 1, "shared initialisation") or
`interpolate` (lam * first teacher's final weights + (1 - lam) * the random initialisation: the paper's Sec. 6
interpolation experiment; lam near 1 is "the teacher's weights plus noise").

Evaluated after every student round on the test set: the student's accuracy (test_accuracy), the teacher's
(ensemble's) accuracy, top-1 agreement and the predictive KL(teacher || student) at temperature 1
(common/distill.py), and both fidelity metrics on the training inputs as well. During the teacher rounds the
logged test accuracy is the teacher ensemble's (logged `phase`: teacher / student).
"""
from __future__ import annotations

import torch

from common.distill import ensemble_probs, kd_loss, log_ensemble_probs, predictive_kl, top1_agreement
from common.errors import SuiteError
from common.fl.algorithms import Centralised, State, register_algorithm
from common.fl.engine import clone_state, sub_seed

INITS = ("random", "teacher_init", "interpolate")
EXTRAS = ("none", "mixup", "generated", "noise")
TRAIN_EVAL_LIMIT = 5000  # fidelity on the training inputs: the first (at most) 5,000 of them


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def fidelity(teacher_logits: list[torch.Tensor], student_logits: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """Accuracy of teacher (ensemble: mean of softmaxes) and student, top-1 agreement and KL(teacher || student)."""
    t_log = log_ensemble_probs(teacher_logits)
    s_log = torch.log_softmax(student_logits.float(), dim=1)
    out = {"agreement": top1_agreement(t_log, s_log), "kl": predictive_kl(t_log, s_log)}
    if y is not None:
        out["teacher_accuracy"] = (t_log.argmax(1) == y).double().mean().item()
        out["student_accuracy"] = (s_log.argmax(1) == y).double().mean().item()
    return out


def interpolate(teacher: State, random: State, lam: float) -> State:
    """lam * teacher + (1 - lam) * random for floating-point entries; other entries (counters) from the teacher."""
    return {k: lam * teacher[k] + (1 - lam) * random[k] if teacher[k].is_floating_point() else teacher[k].clone()
            for k in teacher}


@register_algorithm("kd_fidelity")
class KDFidelity(Centralised):
    transient = (*Centralised.transient, "teacher_models", "extra_inputs", "batch_gen")

    def __init__(self, teachers: int = 1, teacher_rounds: int = 10, temperature: float = 4.0, init: str = "random",
                 lam: float = 0.0, extra: str = "none", extra_size: int = 0, extra_seed: int = 1,
                 noise_std: float = 0.1, student_lr: float | None = None, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if teachers < 1:
            raise SuiteError(f"kd_fidelity: teachers must be at least 1, got {teachers}")
        if init not in INITS:
            raise SuiteError(f"kd_fidelity: unknown init '{init}'; use one of {', '.join(INITS)}")
        if extra not in EXTRAS:
            raise SuiteError(f"kd_fidelity: unknown extra '{extra}'; use one of {', '.join(EXTRAS)}")
        if not 0.0 <= lam <= 1.0:
            raise SuiteError(f"kd_fidelity: lam must lie in [0, 1], got {lam}")
        self.teachers, self.teacher_rounds, self.temperature = teachers, teacher_rounds, temperature
        self.init, self.lam, self.extra = init, lam, extra
        self.extra_size, self.extra_seed, self.noise_std = extra_size, extra_seed, noise_std
        if student_lr is not None and student_lr <= 0:
            raise SuiteError(f"kd_fidelity: student_lr must be positive, got {student_lr}")
        self.student_lr = student_lr  # None: training.lr, as the teachers

    # --- set-up -------------------------------------------------------------------------------------------------
    def setup(self, ctx):
        super().setup(ctx)  # the pooled training data as one client
        if ctx.spec["training"]["rounds"] <= self.teacher_rounds:
            raise SuiteError(f"kd_fidelity: training.rounds ({ctx.spec['training']['rounds']}) must exceed "
                             f"teacher_rounds ({self.teacher_rounds}): the student trains in the rounds after")
        ctx.parts[:] = [ctx.parts[0]] * (self.teachers + 1)  # teachers 0..k-1, the student k: all the data
        self.random_init = clone_state(ctx.model)  # the student's own initialisation (the engine's, from the seed)
        self.teacher_states, self.teacher_initial = [], None
        for k in range(self.teachers):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sub_seed(ctx.spec["seed"], 0x7EAC, k))
                self.teacher_states.append(clone_state(ctx.make_model()))
            if k == 0:
                self.teacher_initial = {n: v.clone() for n, v in self.teacher_states[0].items()}
        self.teacher_models = [ctx.make_model() for _ in range(self.teachers)]
        self.extra_inputs = None
        if self.extra == "generated":
            if ctx.spec["dataset"]["name"] != "mnist1d":
                raise SuiteError("kd_fidelity: extra 'generated' draws new signals from the mnist1d generator; "
                                 f"dataset '{ctx.spec['dataset']['name']}' has none (use mixup or noise)")
            if self.extra_size < 1:
                raise SuiteError("kd_fidelity: extra 'generated' needs extra_size >= 1")
            from common.data.offline import mnist1d_unlabelled
            self.extra_inputs = mnist1d_unlabelled(self.extra_size, self.extra_seed).to(ctx.device)
        self.batch_gen = None
        self.student_started = False  # set once the student's first round began (saved in checkpoints)
        self.training_student = False

    # --- schedule: teachers first, then the student -------------------------------------------------------------
    def is_student_round(self, round_index: int) -> bool:
        return round_index >= self.teacher_rounds

    def clients_of_round(self, run, round_index):
        return [self.teachers] if self.is_student_round(round_index) else list(range(self.teachers))

    def begin_client(self, model, global_state, client):
        if client < self.teachers:
            model.load_state_dict(self.teacher_states[client])
        elif not self.student_started:
            # the student's first round: its initialisation, chosen now that the teachers are trained
            if self.init == "teacher_init":
                model.load_state_dict(self.teacher_initial)
            elif self.init == "interpolate":
                model.load_state_dict(interpolate(self.teacher_states[0], self.random_init, self.lam))
            self.student_started = True

    def train_client(self, run, client, round_index):
        # student rounds count their own epochs from 0 (the learning-rate decay restarts for the student); the
        # batch order of (round, client) stays distinct from every teacher's, as the student is client k
        self.training_student = client == self.teachers
        if self.training_student:
            self.load_teachers()
            self.batch_gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, 0xE1A))
            lr = run.lr
            if self.student_lr is not None:  # the student's own initial learning rate (same decay)
                run.lr = self.student_lr
            try:
                return run.local_train(client, round_index - self.teacher_rounds)
            finally:
                run.lr = lr
        return run.local_train(client, round_index)

    def load_teachers(self) -> None:
        for m, s in zip(self.teacher_models, self.teacher_states):
            m.load_state_dict(s)
            m.eval()

    def extra_batch(self, x: torch.Tensor) -> torch.Tensor | None:
        """Extra distillation inputs for a batch x of training inputs (as many as x), or None."""
        g, n = self.batch_gen, len(x)
        if self.extra == "mixup":
            lam = torch.rand(n, generator=g).to(x.device).view(-1, *([1] * (x.dim() - 1)))
            partner = x[torch.randperm(n, generator=g).to(x.device)]
            return lam * x + (1 - lam) * partner
        if self.extra == "noise":
            return x + self.noise_std * torch.randn(x.shape, generator=g).to(x.device)
        if self.extra == "generated":
            idx = torch.randint(len(self.extra_inputs), (n,), generator=g).to(x.device)
            return self.extra_inputs[idx]
        return None

    def local_loss(self, model, x, y):
        if not self.training_student:  # a teacher: cross-entropy on the labels
            return super().local_loss(model, x, y)
        extra = self.extra_batch(x)
        inputs = x if extra is None else torch.cat([x, extra])
        with torch.no_grad():
            target = ensemble_probs([t(inputs) for t in self.teacher_models], self.temperature, "probs")
        return kd_loss(model(inputs), target, self.temperature)

    def server_update(self, global_state, client_states, weights, round_index):
        if self.is_student_round(round_index):
            return client_states[0]
        for k, state in enumerate(client_states):
            self.teacher_states[k] = state
        return global_state  # the student's initialisation is unchanged while the teachers train

    # --- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, run, global_state):
        from common.fl.engine import evaluate
        self.load_teachers()
        t_test = [logits_of(m, run.x_test) for m in self.teacher_models]
        t_log = log_ensemble_probs(t_test)
        teacher_acc = (t_log.argmax(1) == run.y_test).double().mean().item()
        members = [(z.argmax(1) == run.y_test).double().mean().item() for z in t_test]
        if not self.is_student_round(len(run.ctx.history.rounds)):
            nll = torch.nn.functional.nll_loss(t_log, run.y_test).item()
            return {"test_accuracy": teacher_acc, "test_loss": nll, "phase": "teacher",
                    "teacher_accuracy": teacher_acc, "teacher_members": members,
                    **{k: None for k in ("agreement", "kl", "train_agreement", "train_kl")}}
        run.ctx.model.load_state_dict(global_state)
        acc, loss = evaluate(run.ctx.model, run.x_test, run.y_test)
        test = fidelity(t_test, logits_of(run.ctx.model, run.x_test))
        x_train = run.x[:TRAIN_EVAL_LIMIT]
        train = fidelity([logits_of(m, x_train) for m in self.teacher_models], logits_of(run.ctx.model, x_train))
        return {"test_accuracy": acc, "test_loss": loss, "phase": "student", "teacher_accuracy": teacher_acc,
                "teacher_members": members, "agreement": test["agreement"], "kl": test["kl"],
                "train_agreement": train["agreement"], "train_kl": train["kl"]}
