"""FRSKD: feature refinement via self-knowledge distillation (Ji, Shin, Hwang, Park, Moon, CVPR 2021), and the
self-distillation baselines it is compared with, as centralised runs of the shared engine (one client holding all
the training data; common/fl/engine.py).

`frskd`: the classifier (a ResNet from common/models) gets an auxiliary self-teacher network built on its stage
output maps F_1..F_n (finest first), trained jointly with it in the same run, by the same optimiser:
- lateral 1x1 convolutions L_i = conv(F_i) widen every map to `width` x its channels (the authors' BiFPNc, width 2);
- a top-down path P_n = L_n, P_i = conv3(w1 * L_i + w2 * up(P_{i+1})), up = nearest 2x upsampling and a 1x1
  convolution to the finer level's width;
- a bottom-up path T_1 = P_1, T_i = conv3(w1 * L'_i + w2 * P_i + w3 * down(T_{i-1})) (the top level has no P_i term),
  L'_i a second lateral convolution of F_i, down = 3x3 max-pooling of stride 2 ("same" padding) and a 1x1
  convolution; w are BiFPN's fast normalised fusion weights relu(w) / (sum relu(w) + 1e-6), initialised to 1;
  conv3 is `depth` depthwise-separable 3x3 convolutions with BatchNorm (ReLU between them); every fused input is
  passed through a ReLU first and every output T_i leaves through one;
- the self-teacher's logits: a linear layer on the global average of T_n.
The loss of each batch (the authors' code):
  CE(classifier) + CE(self-teacher) + alpha * T^2 KL(softmax(z_t / T) || softmax(z_c / T))
  + beta * sum_i mean((phi(T_i) - phi(F_i))^2),   phi = the L2-normalised spatial attention map (mean over channels of
the squared map); the self-teacher's logits and maps are targets (no gradient through them), while its own
cross-entropy trains it and, through F_i, the classifier too. Only the classifier is evaluated (test_accuracy); the
self-teacher's accuracy after the last epoch is logged as `teacher_accuracy`.

`cs_kd` (Yun et al., CVPR 2020, class-wise self-knowledge distillation): every training sample x of a batch gets a
partner x' of the same class drawn at random from the training data (possibly x itself, as the authors' sampler);
loss CE(x) + lamda * T^2 KL(softmax(z(x') / T) || softmax(z(x) / T)), the partner's logits computed without
gradient (BatchNorm in training mode, as the authors' code).

`tf_kd_reg` (Yuan et al., CVPR 2020, teacher-free KD with the manually designed "virtual" teacher, Tf-KD_reg):
(1 - alpha) CE + alpha * multiplier * KL(softmax(u / T) || softmax(z)) with u = 0.99 on the true class
(common/distill.py, `virtual_teacher_loss`). The self-training variant (Tf-KD_self, a pretrained copy as teacher)
is not run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.distill import attention_transfer_loss, kd_from_logits, virtual_teacher_loss
from common.errors import SuiteError
from common.fl.algorithms import Centralised, register_algorithm
from common.fl.engine import sub_seed
from common.models import stage_channels, stage_maps


def separable_block(cin: int, cout: int, depth: int) -> nn.Sequential:
    """`depth` depthwise 3x3 + pointwise 1x1 convolutions, each followed by BatchNorm, with ReLU between them."""
    layers: list[nn.Module] = []
    for d in range(depth):
        c = cin if d == 0 else cout
        if d:
            layers.append(nn.ReLU())
        layers += [nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.Conv2d(c, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers)


def pointwise(cin: int, cout: int) -> nn.Sequential:
    """1x1 convolution, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def fusion_weights(w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """BiFPN's fast normalised fusion: relu(w) / (sum relu(w) + eps)."""
    w = torch.relu(w)
    return w / (w.sum() + eps)


def same_maxpool(x: torch.Tensor) -> torch.Tensor:
    """3x3 max-pooling of stride 2 with TensorFlow's "same" padding (output ceil(H/2) x ceil(W/2)); the inputs are
    non-negative (after a ReLU), so zero padding never wins the max over a real value."""
    h, w = x.shape[-2:]
    ph, pw = max((-(-h // 2) - 1) * 2 + 3 - h, 0), max((-(-w // 2) - 1) * 2 + 3 - w, 0)
    return F.max_pool2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), 3, 2)


class SelfTeacher(nn.Module):
    """FRSKD's self-teacher on the classifier's stage maps (channels `channels`, finest first): lateral
    convolutions, a top-down and a bottom-up path with weighted fusion; returns the refined maps T_i (width x the
    classifier's channels, the classifier's spatial sizes) and its logits."""

    def __init__(self, channels: list[int], num_classes: int, width: int = 2, depth: int = 2):
        super().__init__()
        n, wide = len(channels), [c * width for c in channels]
        if n < 2:
            raise SuiteError("the FRSKD self-teacher needs at least two stage maps")
        self.lateral = nn.ModuleList(pointwise(c, wc) for c, wc in zip(channels, wide))
        self.lateral_up = nn.ModuleList(pointwise(channels[i], wide[i]) for i in range(1, n))
        self.up = nn.ModuleList(pointwise(wide[i + 1], wide[i]) for i in range(n - 1))  # after 2x upsampling
        self.up_conv = nn.ModuleList(separable_block(wide[i], wide[i], depth) for i in range(n - 1))
        self.up_weight = nn.ParameterList(nn.Parameter(torch.ones(2)) for _ in range(n - 1))
        self.down = nn.ModuleList(pointwise(wide[i - 1], wide[i]) for i in range(1, n))  # after max-pooling
        self.down_conv = nn.ModuleList(separable_block(wide[i], wide[i], depth) for i in range(1, n))
        self.down_weight = nn.ParameterList(nn.Parameter(torch.ones(3 if i < n - 1 else 2)) for i in range(1, n))
        self.fc = nn.Linear(wide[-1], num_classes)

    def forward(self, maps: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        n = len(maps)
        lat = [conv(F.relu(f)) for conv, f in zip(self.lateral, maps)]
        lat_up = [self.lateral_up[i - 1](F.relu(maps[i])) for i in range(1, n)]
        # top-down: P_n = L_n, P_i from L_i and the upsampled P_{i+1}
        p = [None] * n
        p[-1] = lat[-1]
        for i in range(n - 2, -1, -1):
            w = fusion_weights(self.up_weight[i])
            up = self.up[i](F.interpolate(F.relu(p[i + 1]), size=lat[i].shape[-2:], mode="nearest"))
            p[i] = self.up_conv[i](w[0] * F.relu(lat[i]) + w[1] * up)
        # bottom-up: T_1 = P_1, T_i from L'_i, P_i (not at the top) and the max-pooled T_{i-1}
        t = [p[0]]
        for i in range(1, n):
            w = fusion_weights(self.down_weight[i - 1])
            down = self.down[i - 1](same_maxpool(F.relu(t[-1])))
            fused = w[0] * F.relu(lat_up[i - 1]) + (w[1] * F.relu(p[i]) + w[2] * down if i < n - 1 else w[1] * down)
            t.append(self.down_conv[i - 1](fused))
        t = [F.relu(x) for x in t]
        return t, self.fc(torch.flatten(F.adaptive_avg_pool2d(t[-1], 1), 1))


class WithSelfTeacher(nn.Module):
    """The classifier and its self-teacher as one module, so the engine's optimiser, checkpoints and final model
    hold both; called on an input it is the classifier alone (what is evaluated)."""

    def __init__(self, classifier: nn.Module, teacher: SelfTeacher):
        super().__init__()
        self.classifier, self.teacher = classifier, teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def both(self, x: torch.Tensor):
        """(classifier maps, classifier logits, self-teacher maps, self-teacher logits)."""
        maps, logits = stage_maps(self.classifier, x)
        t_maps, t_logits = self.teacher(maps)
        return maps, logits, t_maps, t_logits


def frskd_loss(logits, t_logits, maps, t_maps, y, alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """CE(classifier) + CE(self-teacher) + alpha * soft-label KD(classifier <- self-teacher) + beta * sum of the
    attention-transfer losses between the self-teacher's refined maps and the classifier's maps."""
    feature = sum(attention_transfer_loss(f, t) for f, t in zip(maps, t_maps))
    return (F.cross_entropy(logits, y) + F.cross_entropy(t_logits, y)
            + alpha * kd_from_logits(logits, t_logits, temperature) + beta * feature)


@register_algorithm("frskd")
class FRSKD(Centralised):
    def __init__(self, alpha: float = 2.0, beta: float = 100.0, temperature: float = 4.0, width: int = 2,
                 depth: int = 2, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if width < 1 or depth < 1:
            raise SuiteError(f"frskd: width and depth must be at least 1, got {width} and {depth}")
        self.alpha, self.beta, self.temperature, self.width, self.depth = alpha, beta, temperature, width, depth

    def setup(self, ctx):
        if not isinstance(ctx.model, WithSelfTeacher):  # a second set-up (a checkpoint that did not fit) keeps it
            classifier = ctx.model
            # the self-teacher's initialisation from a seed of its own: the classifier's is the run's, the same as
            # every other method's of this seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sub_seed(ctx.spec["seed"], 0xF25D))
                teacher = SelfTeacher(stage_channels(classifier), ctx.data.num_classes, self.width, self.depth)
            ctx.model = WithSelfTeacher(classifier, teacher.to(ctx.device))
        super().setup(ctx)

    def local_loss(self, model, x, y):
        maps, logits, t_maps, t_logits = model.both(x)
        return frskd_loss(logits, t_logits, maps, t_maps, y, self.alpha, self.beta, self.temperature)

    def evaluate(self, run, global_state):
        """The classifier as every method's model; after the last epoch also the self-teacher's accuracy on the
        whole test set (`teacher_accuracy`, None before: it costs a forward pass of both networks)."""
        from common.fl.engine import evaluate
        metrics = super().evaluate(run, global_state)
        last = len(run.ctx.history.rounds) + 1 == run.rounds
        metrics["teacher_accuracy"] = evaluate(_TeacherView(run.ctx.model), run.x_test, run.y_test)[0] if last \
            else None
        return metrics


class _TeacherView(nn.Module):
    """The self-teacher's prediction on an input (through the classifier's maps), for evaluation."""

    def __init__(self, net: WithSelfTeacher):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.both(x)[3]


@register_algorithm("cs_kd")
class CSKD(Centralised):
    transient = (*Centralised.transient, "run", "gen", "by_class", "class_start", "class_count")

    def __init__(self, lamda: float = 1.0, temperature: float = 4.0, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.lamda, self.temperature = lamda, temperature

    def setup(self, ctx):
        super().setup(ctx)
        # the training samples sorted by class: partners are drawn from a class's slice of this list
        idx = ctx.parts[0].to(ctx.device)
        labels = ctx.data.train.y.to(ctx.device)[idx]
        order = torch.argsort(labels, stable=True)
        self.by_class = idx[order]
        counts = torch.bincount(labels, minlength=ctx.data.num_classes)
        self.class_count = counts
        self.class_start = torch.cumsum(counts, 0) - counts
        self.run, self.gen = None, None

    def partners(self, y: torch.Tensor) -> torch.Tensor:
        """For every label, the index of a training sample of that class drawn uniformly (with replacement)."""
        u = torch.rand(len(y), generator=self.gen, dtype=torch.float64).to(y.device)
        pick = (u * self.class_count[y]).long().clamp(max=self.class_count[y] - 1)
        return self.by_class[self.class_start[y] + pick]

    def train_client(self, run, client, round_index):
        self.run = run
        self.gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, 0xC5CD))
        return run.local_train(client, round_index)

    def local_loss(self, model, x, y):
        logits = model(x)
        with torch.no_grad():
            partner_logits = model(self.run.x[self.partners(y)])
        return F.cross_entropy(logits, y) + self.lamda * kd_from_logits(logits, partner_logits, self.temperature)


@register_algorithm("tf_kd_reg")
class TFKDReg(Centralised):
    def __init__(self, alpha: float = 0.1, temperature: float = 20.0, multiplier: float = 100.0,
                 correct_prob: float = 0.99, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if not 0.0 < correct_prob < 1.0:
            raise SuiteError(f"tf_kd_reg: correct_prob must lie in (0, 1), got {correct_prob}")
        self.alpha, self.temperature, self.multiplier, self.correct_prob = alpha, temperature, multiplier, correct_prob

    def local_loss(self, model, x, y):
        return virtual_teacher_loss(model(x), y, self.alpha, self.temperature, self.multiplier, self.correct_prob)
