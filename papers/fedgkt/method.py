"""FedGKT (He, Annavaram, Avestimehr, NeurIPS 2020): group knowledge transfer between small edge CNNs and a large
server CNN. No weights travel: every round each client trains its edge model (feature extractor + small classifier)
with cross-entropy and, once it has them, distillation from the server's logits of its samples; it then sends the
extracted features of its training data, its own logits and the labels. The server trains its large model (a
ResNet body on the features) on every client's features with distillation from the clients' logits plus
cross-entropy, for several epochs, and sends back its logits of each client's samples.

Facts taken from the authors' code (FedML, fedml_api/distributed/fedgkt: GKTClientTrainer, GKTServerTrainer,
utils.KL_Loss; fedml_experiments/distributed/fedgkt/main_fedgkt.py):
- distillation loss: T^2 KL(softmax(teacher / T) + 1e-7 || softmax(student / T)), batch mean; T = 3 (default);
- client loss: CE + alpha * KD(server logits), CE only until server logits exist (round 0); alpha = 1 (default);
- server loss: KD(client logits) + alpha * CE (whether_distill_on_the_server);
- the logits sent back are the server model's outputs in training mode during its last epoch (before each step);
- both sides use Adam (lr 1e-3 in the README's runs, weight decay 1e-4, AMSGrad), created once and kept across
  rounds (`training.amsgrad`, `training.keep_optimizer`-like: the client's optimiser state is kept here always);
- the test accuracy is the server model on test features that each client's extractor produces (every client
  holds the whole test set in FedML's loaders), averaged over clients.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from common.distill import kd_from_logits
from common.errors import SuiteError
from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.communication import LABEL_BYTES, dense_bytes
from common.fl.engine import evaluate, minimise, sub_seed
from common.models.split import SplitNet

TEACHER_EPS = 1e-7  # added to the teacher's probabilities in the authors' KL_Loss


def client_loss(edge_logits: torch.Tensor, y: torch.Tensor, server_logits: torch.Tensor | None, alpha: float,
                temperature: float) -> torch.Tensor:
    """The edge model's objective: CE(edge, y) + alpha * KD(edge <- server); CE alone without server logits."""
    ce = F.cross_entropy(edge_logits, y)
    if server_logits is None:
        return ce
    return ce + alpha * kd_from_logits(edge_logits, server_logits, temperature, TEACHER_EPS)


def server_loss(server_logits: torch.Tensor, y: torch.Tensor, client_logits: torch.Tensor, alpha: float,
                temperature: float, distill: bool = True) -> torch.Tensor:
    """The server model's objective on uploaded features: KD(server <- client) + alpha * CE(server, y) (the authors'
    weighting; with alpha = 1 both sides weigh CE and KD equally); CE alone when `distill` is off."""
    ce = F.cross_entropy(server_logits, y)
    if not distill:
        return ce
    return kd_from_logits(server_logits, client_logits, temperature, TEACHER_EPS) + alpha * ce


@register_algorithm("fedgkt")
class FedGKT(Algorithm):
    """Needs the split network (`model: {name: split_resnet, part: gkt}`). The run's global state holds the server
    model (and the initial edge model, which every client starts from); each client's edge model, the server's
    logits of every training sample and the server's optimiser are the algorithm's state (checkpointed)."""
    transient = Algorithm.transient + ("server_net", "uploads")

    def __init__(self, temperature: float = 3.0, alpha: float = 1.0, server_epochs: int = 20,
                 server_lr: float = 1e-3, server_weight_decay: float = 1e-4, amsgrad: bool = True,
                 distill_on_server: bool = True, distill_on_client: bool = True):
        self.temperature, self.alpha, self.server_epochs = temperature, alpha, server_epochs
        self.server_lr, self.server_weight_decay, self.amsgrad = server_lr, server_weight_decay, amsgrad
        self.distill_on_server, self.distill_on_client = distill_on_server, distill_on_client

    # --- set-up ------------------------------------------------------------------------------------------------
    def setup(self, ctx):
        if not isinstance(ctx.model, SplitNet):
            raise SuiteError("fedgkt needs the split network: model {name: split_resnet, part: gkt}")
        self.ctx = ctx
        self.param_names = [n for n, _ in ctx.model.named_parameters()]
        n, classes = len(ctx.data.train.y), ctx.data.num_classes
        self.server_logits = torch.zeros(n, classes, device=ctx.device)       # the server's last logits per sample
        self.has_server_logits = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        self.edge_states: dict[int, dict] = {}                                 # client -> its edge model's state
        self.server_net = copy.deepcopy(ctx.model)  # the server's copy (only its server half is trained here)
        params = [p for name in self.server_net.server_modules()
                  for p in getattr(self.server_net, name).parameters()]
        self.server_opt = torch.optim.Adam(params, lr=self.server_lr, weight_decay=self.server_weight_decay,
                                           amsgrad=self.amsgrad)
        self.uploads: dict[int, tuple] = {}

    def edge_keys(self, state) -> list[str]:
        prefixes = tuple(f"{m}." for m in self.ctx.model.edge_modules())
        return [k for k in state if k.startswith(prefixes)]

    def load_edge(self, model: SplitNet, client: int | None) -> None:
        """Put the client's edge model into `model` (the initial one of the global state for a client not yet
        trained)."""
        if client is not None and client in self.edge_states:
            model.load_state_dict(self.edge_states[client], strict=False)

    # --- communication ---------------------------------------------------------------------------------------
    def download_bytes(self, global_state, client, round_index):
        """The server's logits of the client's training samples (none before the first server update)."""
        idx = self.ctx.parts[client].to(self.has_server_logits.device)
        return int(self.has_server_logits[idx].sum()) * self.server_logits.shape[1] * self.server_logits.element_size()

    def upload_bytes(self, client_state, client, round_index):
        """Features and logits of every training sample of the client (float32) and its labels (one byte each)."""
        idx, features, logits = self.uploads[client]
        return dense_bytes([features, logits]) + LABEL_BYTES * len(idx)

    # --- client side -------------------------------------------------------------------------------------------
    def train_client(self, run, client, round_index):
        model: SplitNet = self.ctx.model
        self.load_edge(model, client)
        edge = model.client_model()
        opt = run.make_optimizer(edge, run.lr)  # Adam over the edge's parameters, kept across rounds
        if client in run.client_optimizers:
            opt.load_state_dict(run.client_optimizers[client])
        gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, client))
        model.train()
        batches = run.client_batches(client, run.epochs, gen, also=(self.server_logits, self.has_server_logits))

        def losses():
            for x, y, s, has in batches:
                out = edge(x)
                if not self.distill_on_client or not bool(has.any()):
                    yield client_loss(out, y, None, self.alpha, self.temperature)
                elif bool(has.all()):
                    yield client_loss(out, y, s, self.alpha, self.temperature)
                else:  # a client sampled before some of its samples have server logits (never with all clients)
                    yield F.cross_entropy(out, y) + self.alpha * kd_from_logits(
                        out[has], s[has], self.temperature, TEACHER_EPS) * has.float().mean()

        loss, steps = minimise(losses(), opt)
        run.client_optimizers[client] = opt.state_dict()
        # what the client sends: features of its training data, its logits (eval mode, as the authors' second pass)
        idx = self.ctx.parts[client].to(run.x.device)
        model.eval()
        with torch.no_grad():
            feats, logits = [], []
            for i in range(0, len(idx), 1000):
                f = model.extractor(run.x[idx[i:i + 1000]])
                feats.append(f)
                logits.append(model.edge_head(model.edge_body(f)))
        self.uploads[client] = (idx, torch.cat(feats), torch.cat(logits))
        state = model.state_dict()
        self.edge_states[client] = {k: state[k].detach().clone() for k in self.edge_keys(state)}
        return loss, steps

    # --- server side -------------------------------------------------------------------------------------------
    def server_update(self, global_state, client_states, weights, round_index):
        net: SplitNet = self.server_net
        net.load_state_dict(global_state)
        net.train()
        y_all = self.ctx.data.train.y.to(self.ctx.device)
        gen = torch.Generator().manual_seed(sub_seed(self.ctx.spec["seed"], round_index, 0x6C7))
        batch = self.ctx.spec["training"]["batch_size"]
        last_losses = []
        for epoch in range(self.server_epochs):
            last = epoch == self.server_epochs - 1
            for k in sorted(self.uploads):  # client by client, as the authors' server iterates its clients
                idx, feats, logits = self.uploads[k]
                perm = torch.randperm(len(idx), generator=gen).to(feats.device)
                for i in range(0, len(idx), batch):
                    b = perm[i:i + batch]
                    out = net.server(feats[b])
                    loss = server_loss(out, y_all[idx[b]], logits[b], self.alpha, self.temperature,
                                       self.distill_on_server)
                    self.server_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.server_opt.step()
                    if last:  # the logits sent back: the training-mode outputs of the last epoch
                        self.server_logits[idx[b]] = out.detach()
                        self.has_server_logits[idx[b]] = True
                        last_losses.append(loss.item())
        if last_losses:
            self.ctx.history.log("server_loss", float(sum(last_losses) / len(last_losses)))
        self.uploads = {}
        new = dict(global_state)
        state = net.state_dict()
        prefixes = tuple(f"{m}." for m in net.server_modules())
        new.update({k: v.detach().clone() for k, v in state.items() if k.startswith(prefixes)})
        return new

    # --- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, run, global_state):
        """The server model on each client's test features (its extractor on the whole test set), mean over clients
        (the authors' server-side test accuracy); `edge_accuracy`: the clients' own edge models, mean over clients."""
        if run.per_client:
            raise SuiteError("fedgkt is evaluated on the whole test set through each client's extractor; "
                             "evaluation.per_client is not supported")
        net: SplitNet = self.server_net
        net.load_state_dict(global_state)
        accs, losses, edge_accs = [], [], []
        for k in range(len(self.ctx.parts)):
            self.load_edge(net, k)
            a, l = evaluate(net, run.x_test, run.y_test)
            accs.append(a)
            losses.append(l)
            edge_accs.append(evaluate(net.client_model(), run.x_test, run.y_test)[0])
        net.load_state_dict(global_state)
        mean = lambda v: float(sum(v) / len(v))
        return {"test_accuracy": mean(accs), "test_loss": mean(losses), "edge_accuracy": mean(edge_accs)}
