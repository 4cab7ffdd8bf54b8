"""Split a labelled training set over federated clients.

Each partitioner returns one sorted int64 index tensor per client; together they assign every sample exactly
once. All randomness comes from `seed`, so a partition is a pure function of (labels, scheme, parameters, seed).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from common.errors import SuiteError


def iid(labels: torch.Tensor, clients: int, seed: int) -> list[torch.Tensor]:
    perm = np.random.default_rng(seed).permutation(len(labels))
    return _to_tensors(np.array_split(perm, clients))


def dirichlet(labels: torch.Tensor, clients: int, alpha: float, seed: int, min_size: int = 10,
              max_tries: int = 1000) -> list[torch.Tensor]:
    """Label skew: each class is split over clients by proportions drawn from Dirichlet(alpha * 1).

    Redrawn until every client holds at least `min_size` samples (the usual convention in FedDF/MOON code).
    """
    if alpha <= 0:
        raise SuiteError(f"dirichlet alpha must be > 0, got {alpha}")
    y = labels.numpy()
    if min_size * clients > len(y):
        raise SuiteError(f"cannot give {clients} clients at least {min_size} samples each from {len(y)} samples")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return _to_tensors(merged)
    raise SuiteError(f"no Dirichlet({alpha}) partition over {clients} clients with min_size={min_size} "
                     f"found in {max_tries} draws; lower min_size")


def shards(labels: torch.Tensor, clients: int, shards_per_client: int, seed: int) -> list[torch.Tensor]:
    """Pathological non-IID (McMahan et al.): sort by label, cut into equal shards, give each client k shards."""
    y = labels.numpy()
    rng = np.random.default_rng(seed)
    # Ties broken at random so which samples of a class end up in which shard depends on the seed too.
    order = np.lexsort((rng.random(len(y)), y))
    pieces = np.array_split(order, clients * shards_per_client)
    owner = rng.permutation(clients * shards_per_client)
    return _to_tensors([np.concatenate([pieces[s] for s in owner[k::clients]]) for k in range(clients)])


def by_domain(labels: torch.Tensor, clients: int, seed: int, domains: torch.Tensor,
              fraction: float = 1.0, hold_out: int | None = None, only: list[int] | None = None) -> list[torch.Tensor]:
    """Feature shift (FedBN): client k holds domain k. With `fraction` < 1 each client keeps a random,
    class-stratified share of its domain's training data (the paper's "percentage" of each dataset); the rest
    is used by no client. With `hold_out` (a domain index; `partition` also takes its name) that domain has no
    client (leave-one-domain-out, FedDG): the clients hold the other domains in order. With `only` (domain indices;
    `partition` also takes names) just those domains get a client, in the dataset's order (domain adaptation between
    two domains of a dataset with more: Office-31's amazon -> webcam leaves dslr unused)."""
    n_domains = int(domains.max()) + 1
    selected = [d for d in range(n_domains) if d != hold_out and (only is None or d in only)]
    if only is not None and hold_out in only:
        raise SuiteError("partition: the held-out domain cannot also be one of `only`")
    expected = len(selected)
    if clients != expected:
        raise SuiteError(f"partition scheme 'domain' gives one client per domain"
                         f"{' except the held-out one' if hold_out is not None else ''}"
                         f"{' of those in `only`' if only is not None else ''}: clients must be {expected}, "
                         f"got {clients}")
    if not 0 < fraction <= 1:
        raise SuiteError(f"partition fraction must be in (0, 1], got {fraction}")
    y, dom = labels.numpy(), domains.numpy()
    rng = np.random.default_rng(seed)
    parts = []
    for d in selected:
        keep = []
        for c in np.unique(y[dom == d]):
            idx = rng.permutation(np.flatnonzero((dom == d) & (y == c)))
            keep.append(idx[:max(1, int(round(fraction * len(idx))))])
        parts.append(np.concatenate(keep))
    return _to_tensors(parts)


PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "shards": shards, "domain": by_domain}
NEEDS_DOMAINS = {"domain"}


def partition(labels: torch.Tensor, scheme: str, seed: int, domains: torch.Tensor | None = None,
              domain_names: tuple[str, ...] = (), **params) -> list[torch.Tensor]:
    """Client index sets. `domains` (the domain index of each sample) is used by the schemes that need it;
    `hold_out` may name a domain of `domain_names`. Segmentation masks (N, S, H, W) count as one class."""
    if labels.dim() > 1:
        labels = torch.zeros(len(labels), dtype=torch.int64)
    if isinstance(params.get("hold_out"), str):
        if params["hold_out"] not in domain_names:
            raise SuiteError(f"hold_out '{params['hold_out']}' is not a domain of the dataset "
                             f"({', '.join(domain_names) or 'none'})")
        params["hold_out"] = domain_names.index(params["hold_out"])
    if params.get("only") is not None:
        unknown = [d for d in params["only"] if isinstance(d, str) and d not in domain_names]
        if unknown:
            raise SuiteError(f"partition only: {', '.join(unknown)} not a domain of the dataset "
                             f"({', '.join(domain_names) or 'none'})")
        params["only"] = [domain_names.index(d) if isinstance(d, str) else int(d) for d in params["only"]]
    if scheme not in PARTITIONERS:
        raise SuiteError(f"unknown partition scheme '{scheme}'; known: {', '.join(PARTITIONERS)}")
    if scheme in NEEDS_DOMAINS:
        if domains is None:
            raise SuiteError(f"partition scheme '{scheme}' needs a dataset with domains (e.g. digits5)")
        params["domains"] = domains
    parts = PARTITIONERS[scheme](labels, seed=seed, **params)
    # a per-domain share leaves some samples unused; every other partition covers the training set exactly
    check_disjoint_cover(parts, len(labels), cover=params.get("fraction", 1.0) == 1.0 and params.get("hold_out") is None
                         and params.get("only") is None)
    return parts


def check_disjoint_cover(parts: list[torch.Tensor], n: int, cover: bool = True) -> None:
    """No sample in two clients and (when `cover`) none left out."""
    allidx = torch.cat(parts)
    if len(allidx) != len(torch.unique(allidx)) or (len(allidx) and (allidx.min() < 0 or allidx.max() >= n)):
        raise AssertionError("partition assigns a sample to two clients or an index outside the training set")
    if cover and len(allidx) != n:
        raise AssertionError("partition does not assign every sample exactly once")


def client_test_split(train_groups: torch.Tensor, parts: list[torch.Tensor], test_groups: torch.Tensor,
                      seed: int) -> list[torch.Tensor]:
    """Each client's own test split, drawn from the shared test set so that it follows the client's training
    distribution (pFedHN's protocol: the test set is split with the clients' class proportions). A group is a label
    (or, on multi-domain data, a domain): the test samples of group g, in a random order drawn from `seed`, are cut
    among the clients in proportion to how many training samples of g each holds (largest remainders round). The
    splits are disjoint; a group no client trains on is left out. A client holding a whole domain gets exactly that
    domain's test samples. Indices into the test set, sorted."""
    tr, te = train_groups.numpy(), test_groups.numpy()
    n_groups = int(max(tr.max(initial=0), te.max(initial=0))) + 1
    counts = np.stack([np.bincount(tr[p.numpy()], minlength=n_groups) for p in parts])  # clients x groups
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[] for _ in parts]
    for g in range(n_groups):
        idx = rng.permutation(np.flatnonzero(te == g))
        held = counts[:, g]
        if held.sum() == 0 or len(idx) == 0:
            continue
        share = held / held.sum() * len(idx)
        n = np.floor(share).astype(int)
        # the samples left by rounding down go to the largest fractional parts (ties: the lower client index)
        for k in np.argsort(-(share - n), kind="stable")[:len(idx) - n.sum()]:
            n[k] += 1
        for k, chunk in enumerate(np.split(idx, np.cumsum(n)[:-1])):
            out[k].append(chunk)
    return _to_tensors([np.concatenate(o) if o else np.zeros(0, dtype=np.int64) for o in out])


def partition_fingerprint(parts: list[torch.Tensor]) -> str:
    """Hash of the client -> sample-index map, recorded with every result."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.numpy().astype(np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _to_tensors(parts) -> list[torch.Tensor]:
    return [torch.as_tensor(np.sort(p), dtype=torch.int64) for p in parts]
