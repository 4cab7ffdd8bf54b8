"""FedGen (Zhu, Hong, Zhou, ICML 2021): data-free knowledge distillation through a server-side generator of
latent (feature-space) samples.

The model splits into a feature extractor and a linear head (`Classifier.features` / `.head`; FedGen's CNN is
`strided_cnn`, whose representation is a linear 32-d layer). A lightweight generator G_w(eps | y), noise plus a
one-hot label through Linear - BatchNorm1d - ReLU - Linear, produces representations at the head's input. As the
authors' code runs it (github.com/zhuangdizhu/FedGen: FLAlgorithms/servers/serverpFedGen.py `train_generator`,
FLAlgorithms/users/userpFedGen.py `train`, FLAlgorithms/trainmodel/generator.py, utils/model_config.py):

Server, every round after local training and before averaging (Algorithm 1, line 14; Eq. 4):
  labels y_i drawn uniformly from the labels some sampled client saw in this round's training ("qualified"),
  eps_i ~ U[0, 1)^noise_dim (the code's `torch.rand`), z_i = G(eps_i | y_i) in train mode, and
  J(w) = sum_k mean_i [ w_{y_i,k} * CE(h_k(z_i), y_i) ] + eta * exp(-mean_{i,j} ||eps_i - eps_j||^2_mean * |z_i - z_j|_mean)
  where h_k is sampled client k's head after its local training and w_{y,k} = c_k[y] / sum_k' c_k'[y], c_k the
  counts of the labels in client k's training batches of the round plus one (the code's `label_counts`,
  initialised to 1). The second term is the code's `DiversityLoss(metric='l1')` (mean absolute difference of the
  outputs, mean squared difference of the noises, over all ordered pairs i, j). Adam (lr 3e-4 on MNIST, weight
  decay 1e-2), `generator_steps` steps (the code's ensemble_epochs // n_teacher_iters * n_teacher_iters = 50) on
  batches of `generator_batch` (the code passes the clients' batch size, 32); the generator's learning rate decays
  by 0.98 per round. The adversarial student term of the code is off (ensemble_beta = 0) and not implemented.

Client k, in rounds r >= 1 (the code regularises "after the first communication round"), on a real batch (x, y):
  L = CE(f(x), y)
      + (gen_batch / batch) * alpha_r * mean_j CE(h(G(eps_j | y~_j)), y~_j)      y~_j uniform over the labels of
                                                                              the whole training set
      + beta_r * KL( softmax(h(G(eps | y))) || softmax(f(x)) )            (target detached, batch mean)
  with alpha_r = max(1e-4, alpha * 0.98^r), beta_r likewise (the code's `exp_lr_scheduler`), G in eval mode
  (BatchNorm running statistics) and never updated by the client. The second term is Eq. 5's regulariser; the
  third (the code's `user_latent_loss`) distils the head's prediction on a generated representation of the
  sample's own label into the whole model's prediction on the sample; beta = 0 leaves Eq. 5 alone.

Only the head meets the generator; the model is averaged as in FedAvg (weighted by client size), and the
generator (its parameters, the number of its parameters in bytes) is downloaded by every sampled client.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.communication import state_bytes
from common.fl.engine import sub_seed


class Generator(nn.Module):
    """G(eps | y): [eps, one_hot(y)] -> Linear(noise_dim + C, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, latent)
    (the authors' `Generator` without embedding; MNIST/EMNIST: hidden 256, latent 32, noise 32)."""

    def __init__(self, num_classes: int, latent: int, hidden: int = 256, noise_dim: int = 32):
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.body = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.out = nn.Linear(hidden, latent)

    def forward(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, self.num_classes).to(eps.dtype)
        return self.out(self.body(torch.cat([eps, onehot], dim=1)))

    def sample(self, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, eps) with eps ~ U[0, 1)^noise_dim drawn from `generator`."""
        eps = torch.rand((len(y), self.noise_dim), generator=generator).to(y.device)
        return self(y, eps), eps


# --- the losses ---------------------------------------------------------------------------------------------------
def diversity_loss(eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """exp(-mean_{i,j} d_eps(i, j) * d_z(i, j)) over all ordered pairs (i = j included), d_eps the mean squared and
    d_z the mean absolute difference over the dimensions (the authors' DiversityLoss with metric 'l1')."""
    z = z.flatten(1)
    d_z = (z.unsqueeze(0) - z.unsqueeze(1)).abs().mean(dim=2)
    d_eps = ((eps.unsqueeze(0) - eps.unsqueeze(1)) ** 2).mean(dim=2)
    return torch.exp(-(d_eps * d_z).mean())


def label_weights(counts: torch.Tensor) -> torch.Tensor:
    """(C, K) weights w[y, k] = counts[k, y] / sum_k' counts[k', y] of the clients' label counts (K, C)."""
    counts = counts.double()
    return (counts / counts.sum(dim=0, keepdim=True)).T


def qualified_labels(counts: torch.Tensor, min_samples: int = 1) -> torch.Tensor:
    """The labels some client counted more than `min_samples` times (counts start at one)."""
    return torch.nonzero(counts.max(dim=0).values > min_samples).flatten()


def teacher_loss(head_weights: torch.Tensor, head_biases: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """sum_k mean_i w[y_i, k] * CE(W_k z_i + b_k, y_i): the clients' heads (K, C, d) and (K, C), weights (C, K)."""
    logits = torch.einsum("kcd,nd->knc", head_weights, z) + head_biases.unsqueeze(1)  # (K, N, C)
    ce = F.cross_entropy(logits.permute(1, 2, 0), y.unsqueeze(1).expand(-1, logits.shape[0]), reduction="none")
    return (ce * weights[y].to(ce.dtype)).mean(dim=0).sum()


def generator_objective(head_weights, head_biases, z, eps, y, weights, eta: float = 1.0,
                        alpha: float = 1.0) -> torch.Tensor:
    """J(w) = alpha * teacher loss + eta * diversity loss (the code's ensemble_alpha, ensemble_eta)."""
    return alpha * teacher_loss(head_weights, head_biases, z, y, weights) + eta * diversity_loss(eps, z)


def decayed(value: float, round_index: int, decay: float = 0.98, floor: float = 1e-4) -> float:
    """max(floor, value * decay^round): the authors' decay of the generative alpha and beta."""
    return max(floor, value * decay ** round_index)


def client_regulariser(head: nn.Module, logits_real: torch.Tensor, z_own: torch.Tensor, z_sampled: torch.Tensor,
                       y_sampled: torch.Tensor, alpha: float, beta: float, gen_ratio: float) -> torch.Tensor:
    """gen_ratio * alpha * CE(h(z_sampled), y_sampled) + beta * KL(softmax(h(z_own)) || softmax(logits_real)):
    z_own generated for the real batch's labels, z_sampled for labels drawn uniformly (both without gradient to G)."""
    target = F.softmax(head(z_own), dim=1).detach()
    latent = F.kl_div(F.log_softmax(logits_real, dim=1), target, reduction="batchmean")
    teacher = F.cross_entropy(head(z_sampled), y_sampled)
    return gen_ratio * alpha * teacher + beta * latent


# --- the algorithm ---------------------------------------------------------------------------------------------
@register_algorithm("fedgen")
class FedGen(Algorithm):
    """FedAvg's server plus the generator; the clients' objective with its regulariser from round 1 on."""
    transient = Algorithm.transient + ("generator", "round_index", "client", "batch_gen", "round_counts",
                                       "available", "batch_size")

    def __init__(self, alpha: float = 10.0, beta: float = 10.0, gen_batch: int = 32, generator_lr: float = 3e-4,
                 generator_weight_decay: float = 1e-2, generator_lr_decay: float = 0.98, generator_steps: int = 50,
                 generator_batch: int = 32, eta: float = 1.0, hidden: int = 256, noise_dim: int = 32,
                 coef_decay: float = 0.98, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if alpha < 0 or beta < 0 or eta < 0:
            raise SuiteError(f"fedgen: alpha, beta and eta must be >= 0, got {alpha}, {beta}, {eta}")
        if generator_batch < 2 or gen_batch < 1 or generator_steps < 0:
            raise SuiteError("fedgen: generator_batch must be >= 2 (BatchNorm), gen_batch >= 1, generator_steps >= 0")
        self.alpha, self.beta, self.gen_batch, self.eta = alpha, beta, gen_batch, eta
        self.generator_lr, self.generator_weight_decay = generator_lr, generator_weight_decay
        self.generator_lr_decay, self.generator_steps, self.generator_batch = generator_lr_decay, generator_steps, generator_batch
        self.hidden, self.noise_dim, self.coef_decay = hidden, noise_dim, coef_decay

    def setup(self, ctx):
        super().setup(ctx)
        head = ctx.model.head
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sub_seed(ctx.spec["seed"], 0x6E4))  # its initialisation, from the run's seed alone
            self.generator = Generator(head.out_features, head.in_features, self.hidden, self.noise_dim).to(ctx.device)
        # saved in checkpoints: the generator's parameters and buffers (restored in place) and its optimiser
        self.generator_tensors = list(self.generator.state_dict(keep_vars=True).values())
        self.generator_opt = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr,
                                              weight_decay=self.generator_weight_decay)
        self.generator_rounds = 0  # rounds the generator trained (its learning rate's decay)
        self.client_counts: list[torch.Tensor] = []  # this round's label counts of each trained client, in order
        labels = ctx.data.train.y[torch.cat(ctx.parts)] if ctx.parts else ctx.data.train.y
        self.available = torch.unique(labels).to(ctx.device)
        self.batch_size = ctx.spec["training"]["batch_size"]
        self.round_index, self.client, self.batch_gen, self.round_counts = 0, None, None, None

    def download_bytes(self, global_state, client, round_index):
        gen = {k: v for k, v in self.generator.state_dict().items()}
        return super().download_bytes(global_state, client, round_index) + state_bytes(gen, list(gen))

    def upload_bytes(self, client_state, client, round_index):  # the model and the label counts (int32)
        return super().upload_bytes(client_state, client, round_index) + 4 * self.ctx.data.num_classes

    # --- client ---------------------------------------------------------------------------------------------
    def train_client(self, run, client, round_index):
        self.round_index, self.client = round_index, client
        self.batch_gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, client, 0x6E5))
        self.round_counts = torch.ones(self.ctx.data.num_classes, dtype=torch.int64)
        self.generator.eval()
        result = super().train_client(run, client, round_index)
        self.client_counts.append(self.round_counts)
        return result

    def local_loss(self, model, x, y):
        self.round_counts += torch.bincount(y.cpu(), minlength=self.ctx.data.num_classes)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.round_index < 1:
            return loss
        with torch.no_grad():
            z_own, _ = self.generator.sample(y, self.batch_gen)
            pick = torch.randint(len(self.available), (self.gen_batch,), generator=self.batch_gen).to(y.device)
            y_sampled = self.available[pick]
            z_sampled, _ = self.generator.sample(y_sampled, self.batch_gen)
        return loss + client_regulariser(model.head, logits, z_own, z_sampled, y_sampled,
                                         decayed(self.alpha, self.round_index, self.coef_decay),
                                         decayed(self.beta, self.round_index, self.coef_decay),
                                         self.gen_batch / self.batch_size)

    # --- server ---------------------------------------------------------------------------------------------
    def train_generator(self, heads: list[tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor,
                        generator: torch.Generator) -> dict[str, float]:
        """`generator_steps` Adam steps on J(w) with the sampled clients' heads and label counts (K, C)."""
        w_heads = torch.stack([w for w, _ in heads]).detach()
        b_heads = torch.stack([b for _, b in heads]).detach()
        weights = label_weights(counts).to(w_heads.device)
        labels = qualified_labels(counts).to(w_heads.device)
        self.generator.train()
        total_t, total_d = 0.0, 0.0
        for _ in range(self.generator_steps if len(labels) else 0):
            y = labels[torch.randint(len(labels), (self.generator_batch,), generator=generator).to(labels.device)]
            z, eps = self.generator.sample(y, generator)
            t = teacher_loss(w_heads, b_heads, z, y, weights)
            d = diversity_loss(eps, z)
            loss = t + self.eta * d
            self.generator_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.generator_opt.step()
            total_t, total_d = total_t + t.item(), total_d + d.item()
        self.generator_rounds += 1
        for group in self.generator_opt.param_groups:
            group["lr"] = self.generator_lr * self.generator_lr_decay ** self.generator_rounds
        self.generator.eval()
        n = max(1, self.generator_steps)
        return {"generator_teacher_loss": total_t / n, "generator_diversity_loss": total_d / n}

    def server_update(self, global_state, client_states, weights, round_index):
        counts = torch.stack(self.client_counts)  # (K, C), in the order of client_states
        heads = [(s["head.weight"], s["head.bias"]) for s in client_states]
        gen = torch.Generator().manual_seed(sub_seed(self.ctx.spec["seed"], round_index, 0x6E6))
        self.last_generator_losses = self.train_generator(heads, counts, gen)
        self.client_counts = []
        return super().server_update(global_state, client_states, weights, round_index)

    def evaluate(self, run, global_state):
        metrics = super().evaluate(run, global_state)
        metrics.update(getattr(self, "last_generator_losses", {}))
        return metrics
