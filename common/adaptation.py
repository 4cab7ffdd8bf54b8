"""Unsupervised domain adaptation on the engine's one-client path.

A domain-adaptation run is a leave-one-domain-out run on a multi-domain dataset (FedDG's setting) whose held-out
domain is the *target*: `partition: {scheme: domain, clients: 1, hold_out: <target>}` gives the one client the
labelled *source* domain(s), exactly as for domain generalisation and for the `centralised` source-only baseline.
An adaptation method (a subclass of `UnsupervisedDA`) also sees the target domain's training **inputs**, never its
labels (`target_inputs` returns images only), draws a batch of them beside every source batch of the engine's loop,
and is evaluated, like every run on multi-domain data, on each domain's test split (`domain_accuracy`; a table reads
the target's with `domain: <target>`). Nothing else changes: one training loop, the same checkpoints, resume and
results. The table's centralised ceiling is the same network trained on the labelled training data of every domain,
the target's included (`common.experiments.centralised_spec`): the oracle that sees the target labels.

`rbf_mmd2` is the squared maximum mean discrepancy with a Gaussian kernel, the domain-confusion loss of DDC (Tzeng
et al. 2014) and of Rozantsev et al. (papers/beyond_sharing).
"""
from __future__ import annotations

import torch

from common.errors import SuiteError
from common.fl.algorithms import Centralised


def rbf_mmd2(a: torch.Tensor, b: torch.Tensor, sigma: float | None = 1.0) -> torch.Tensor:
    """The biased (V-statistic) estimate of MMD^2 between the samples a (n, d) and b (m, d) with the kernel
    k(u, v) = exp(-||u - v||^2 / (2 sigma^2)): mean k(a, a') + mean k(b, b') - 2 mean k(a, b), i.e. the squared
    distance between the two samples' mean embeddings. `sigma` None: the median pairwise distance of the pooled
    sample (the median heuristic, taken without gradient; the lower median, torch.median's, for an even count)."""
    a, b = a.flatten(1), b.flatten(1)
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).pow(2)
    if sigma is None:
        with torch.no_grad():
            off = d2[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
            sigma = off.sqrt().median().clamp_min(1e-6).item()
    k = torch.exp(-d2 / (2 * sigma ** 2))
    n = len(a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def target_domain(spec: dict, domains: tuple[str, ...]) -> int:
    """The index of the run's target domain: the partition's held-out domain (by name or index)."""
    part = spec["partition"]
    if part.get("scheme") != "domain" or part.get("hold_out") is None:
        raise SuiteError("domain adaptation needs a multi-domain dataset and partition {scheme: domain, hold_out: "
                         "<target domain>}: the held-out domain is the unlabelled target")
    held = part["hold_out"]
    if isinstance(held, str):
        if held not in domains:
            raise SuiteError(f"hold_out '{held}' is not a domain of the dataset ({', '.join(domains) or 'none'})")
        return domains.index(held)
    return int(held)


def target_inputs(ctx) -> torch.Tensor:
    """The target domain's training inputs (on the run's device), without their labels."""
    data = ctx.data
    if data.train.domain is None:
        raise SuiteError(f"domain adaptation needs a multi-domain dataset; '{ctx.spec['dataset']['name']}' has none")
    t = target_domain(ctx.spec, data.domains)
    return data.train.x[data.train.domain == t].to(ctx.device)


class UnsupervisedDA(Centralised):
    """Base class of adaptation methods: the labelled source data is the one client (`Centralised` pools the
    partition's clients), `self.x_target` holds the target's training inputs, and `target_batch(n)` gives the next
    n of them, from a permutation drawn per round from the run's seed (passes over the target data follow one
    another), so a resumed run draws the same target batches."""
    transient = (*Centralised.transient, "x_target", "target_gen", "target_order", "target_pos")

    def setup(self, ctx):
        super().setup(ctx)
        self.x_target = target_inputs(ctx)
        if len(self.x_target) == 0:
            raise SuiteError("the target domain has no training inputs")
        self.target_gen, self.target_order, self.target_pos = None, None, 0

    def train_client(self, run, client, round_index):
        from common.fl.engine import sub_seed
        self.target_gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, 0xDA7A))
        self.target_order, self.target_pos = None, 0
        return super().train_client(run, client, round_index)

    def server_update(self, global_state, client_states, weights, round_index):
        return client_states[0]  # one client: its trained state is the model (no server step to round it)

    def target_batch(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.target_order is None or self.target_pos >= len(self.target_order):
                self.target_order = torch.randperm(len(self.x_target), generator=self.target_gen).to(
                    self.x_target.device)
                self.target_pos = 0
            take = self.target_order[self.target_pos:self.target_pos + n]
            self.target_pos += len(take)
            n -= len(take)
            out.append(self.x_target[take])
        return torch.cat(out)
