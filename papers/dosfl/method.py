"""Distilled One-Shot Federated Learning (DOSFL; Zhou, Pu, Ma, Li, Wu, arXiv 2009.07999).

One round. Every client receives the shared initialisation theta_0 and distils its private data into a few synthetic
examples and learnable step sizes (dataset distillation, Wang et al. 2018): `distill_steps` steps of
`images_per_class` synthetic examples per class with fixed labels, replayed for `distill_epochs` epochs, one learned
step size per replayed step. Training from theta_0 on them,

    theta_{i+1} = theta_i - eta_i * grad_theta CE(theta_i; x_syn[i mod S], y_syn[i mod S]),   i = 0 .. S * E_d - 1,

should give a model that fits the client's real data (with `init_from_data`, each synthetic example starts as a
random real example of its class, noise for a class the client lacks; else as standard normal noise, as in Wang et
al.); the synthetic examples and step sizes are optimised (Adam,
`distill_lr`) on CE(theta_T; real batch), differentiated through the whole unrolled training (second-order autograd
through `torch.func.functional_call`). The outer loop runs the spec's `local_epochs` passes over the client's data in
batches of `batch_size`; the step sizes start at the spec's `lr`. Two robustness devices of the paper:
- soft resets: each outer iteration starts from theta_0 plus Gaussian noise of std `soft_reset` (0: a hard reset,
  always theta_0 itself), so that the distilled data works from a neighbourhood of theta_0;
- random masking: each outer iteration replaces a fraction `random_masking` of the synthetic examples by random
  tensors (standard normal), so that training does not depend on any single synthetic example.

The client uploads its synthetic examples (float32), their labels (one byte each) and step sizes once. The server
trains theta_0 on the union of the distilled sets, replaying each client's steps with its learned step sizes:
- serial: client after client (in client order), each client's S * E_d steps;
- parallel: step i applies the clients' steps i together, sum_k w_k eta_k,i grad CE(theta; x_syn_k[i mod S]), with
  w_k the client's share of the training samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.communication import LABEL_BYTES, dense_bytes
from common.fl.engine import minimise, sub_seed


def unrolled_training(model: torch.nn.Module, params: dict[str, torch.Tensor], x_syn: torch.Tensor,
                      y_syn: torch.Tensor, step_sizes: torch.Tensor, create_graph: bool) -> dict[str, torch.Tensor]:
    """Parameters after training `params` on the distilled steps: x_syn (S, n, ...), y_syn (S, n), one step size per
    replayed step (len(step_sizes) = S * epochs). With `create_graph`, the result is differentiable in params,
    x_syn and step_sizes (for distillation); otherwise it is plain SGD on the distilled data (the server)."""
    steps = x_syn.shape[0]
    for i, eta in enumerate(step_sizes):
        loss = F.cross_entropy(functional_call(model, params, (x_syn[i % steps],)), y_syn[i % steps])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {k: p - eta * g for (k, p), g in zip(params.items(), grads)}
        if not create_graph:
            params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    return params


def distillation_loss(model, params0, x_syn, y_syn, step_sizes, x_real, y_real) -> torch.Tensor:
    """CE on real data of the model trained from params0 on the distilled data: what distillation minimises."""
    params = unrolled_training(model, params0, x_syn, y_syn, step_sizes, create_graph=True)
    return F.cross_entropy(functional_call(model, params, (x_real,)), y_real)


@register_algorithm("dosfl")
class DOSFL(Algorithm):
    def __init__(self, distill_steps: int = 10, distill_epochs: int = 3, images_per_class: int = 1,
                 distill_lr: float = 0.01, soft_reset: float = 0.0, random_masking: float = 0.0,
                 server: str = "serial", init_from_data: bool = True):
        super().__init__()
        if server not in ("serial", "parallel"):
            raise ValueError(f"server must be 'serial' or 'parallel', got {server!r}")
        self.distill_steps, self.distill_epochs, self.images_per_class = distill_steps, distill_epochs, images_per_class
        self.distill_lr, self.soft_reset, self.random_masking = distill_lr, soft_reset, random_masking
        self.server, self.init_from_data = server, init_from_data

    def setup(self, ctx):
        super().setup(ctx)
        self.distilled: dict[int, dict[str, torch.Tensor]] = {}  # client -> {"x", "y", "step_sizes"} it uploaded

    # --- client: dataset distillation from the shared initialisation -----------------------------------------
    def train_client(self, run, client, round_index):
        ctx, model = self.ctx, self.ctx.model
        t = ctx.spec["training"]
        gen = torch.Generator().manual_seed(sub_seed(ctx.spec["seed"], round_index, client, 0xD05F))
        classes = ctx.data.num_classes
        shape = tuple(ctx.data.train.x.shape[1:])
        n = classes * self.images_per_class
        idx = ctx.parts[client].to(ctx.device)
        x, y = run.x[idx], run.y[idx]
        y_syn = torch.arange(classes, device=ctx.device).repeat_interleave(self.images_per_class)
        y_syn = y_syn.expand(self.distill_steps, n).contiguous()
        x_syn = torch.randn((self.distill_steps, n, *shape), generator=gen).to(ctx.device)
        if self.init_from_data:  # each synthetic example starts as a random real example of its class
            for c in range(classes):
                pool = (y == c).nonzero().flatten()
                if len(pool):
                    pick = pool[torch.randint(len(pool), (self.distill_steps * self.images_per_class,),
                                              generator=gen).to(pool.device)]
                    x_syn[y_syn == c] = x[pick]
        x_syn.requires_grad_(True)
        step_sizes = torch.full((self.distill_steps * self.distill_epochs,), float(t["lr"]), device=ctx.device,
                                requires_grad=True)
        opt = torch.optim.Adam([x_syn, step_sizes], lr=self.distill_lr)
        theta0 = {k: v.detach() for k, v in model.named_parameters()}
        model.train()

        def losses():
            for x_real, y_real in run.client_batches(client, t["local_epochs"], gen):
                params = {k: (v + self.soft_reset * torch.randn(v.shape, generator=gen).to(v.device)
                              if self.soft_reset else v).requires_grad_(True) for k, v in theta0.items()}
                used = x_syn
                if self.random_masking:
                    masked = (torch.rand(x_syn.shape[:2], generator=gen) < self.random_masking).to(ctx.device)
                    noise = torch.randn(x_syn.shape, generator=gen).to(ctx.device)
                    used = torch.where(masked.view(*masked.shape, *[1] * len(shape)), noise, x_syn)
                yield distillation_loss(model, params, used, y_syn, step_sizes, x_real, y_real)

        loss, steps = minimise(losses(), opt)
        self.distilled[client] = {"x": x_syn.detach().clone(), "y": y_syn.to(torch.uint8),
                                  "step_sizes": step_sizes.detach().clone()}
        return loss, steps

    # --- communication -----------------------------------------------------------------------------------------
    def upload_bytes(self, client_state, client, round_index):
        """The distilled set once: synthetic examples (dense float32), labels (one byte each), step sizes."""
        d = self.distilled[client]
        return dense_bytes([d["x"], d["step_sizes"]]) + d["y"].numel() * LABEL_BYTES

    # --- server: training on the union of the distilled sets -------------------------------------------------
    def server_update(self, global_state, client_states, weights, round_index):
        model = self.ctx.model
        model.load_state_dict(global_state)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
        clients = sorted(self.distilled)
        sets = [self.distilled[k] for k in clients]
        if self.server == "serial":
            for d in sets:
                params = unrolled_training(model, params, d["x"], d["y"].long(), d["step_sizes"], create_graph=False)
        else:
            share = torch.tensor(weights, dtype=torch.float64)
            share = (share / share.sum()).tolist()
            for i in range(self.distill_steps * self.distill_epochs):
                s = i % self.distill_steps
                loss = sum(w * d["step_sizes"][i] * F.cross_entropy(functional_call(model, params, (d["x"][s],)),
                                                                     d["y"][s].long())
                           for w, d in zip(share, sets))
                grads = torch.autograd.grad(loss, list(params.values()))
                params = {k: (p - g).detach().requires_grad_(True) for (k, p), g in zip(params.items(), grads)}
        new = dict(global_state)
        for k, v in params.items():
            new[k] = v.detach().clone()
        return new
