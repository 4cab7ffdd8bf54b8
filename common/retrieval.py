"""Retrieval evaluation (person re-identification): rank-1 (CMC at rank 1) and mean average precision.

Each query is ranked against the gallery of its dataset by the cosine similarity of L2-normalised features (the
model's `features`, its penultimate representation; the classifier is never used). As in Market-1501's protocol
(and the FedReID authors' evaluate.py), gallery images of the query's identity taken by the query's own camera are
junk, left out of that query's ranking, and so are gallery images with identity -1; a query left with no true match
is skipped. A query's average precision is scikit-learn's `average_precision_score` of the true matches against the
similarities (the mean of the precision at each true match; the authors' evaluate.py averages the precision before
and after each match, a trapezoid, which gives slightly higher values); rank-1 is whether the most similar kept
gallery image is a true match (ties: the first in gallery order).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score


def retrieval_metrics(query_f: torch.Tensor, query_id, query_cam, gallery_f: torch.Tensor, gallery_id,
                      gallery_cam) -> dict:
    """{"rank1", "map", "queries" (evaluated), "ap" (per evaluated query), "hit" (rank-1 per evaluated query)}
    from query and gallery features (rows, not necessarily normalised), identities and cameras."""
    qf = F.normalize(torch.as_tensor(query_f, dtype=torch.float64), dim=1)
    gf = F.normalize(torch.as_tensor(gallery_f, dtype=torch.float64), dim=1)
    sims = (qf @ gf.T).numpy()
    qid, qcam = np.asarray(query_id), np.asarray(query_cam)
    gid, gcam = np.asarray(gallery_id), np.asarray(gallery_cam)
    aps, hits = [], []
    for i in range(len(qid)):
        keep = ~((gid == qid[i]) & (gcam == qcam[i])) & (gid != -1)
        match = gid[keep] == qid[i]
        if not match.any():
            continue
        s = sims[i, keep]
        aps.append(float(average_precision_score(match, s)))
        hits.append(float(match[int(np.argmax(s))]))
    if not aps:
        return {"rank1": float("nan"), "map": float("nan"), "queries": 0, "ap": [], "hit": []}
    return {"rank1": float(np.mean(hits)), "map": float(np.mean(aps)), "queries": len(aps), "ap": aps, "hit": hits}


@torch.no_grad()
def extract_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's `features` of every image, in eval mode."""
    model.eval()
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).cpu()


def evaluate_retrieval(run, model_for_client) -> dict:
    """Per-domain retrieval of a ReID run (the engine's per-client evaluation on a dataset with
    `extra["retrieval"]`): each domain's query and gallery images, features from `model_for_client(client)` (the
    client holding the domain; None when no single client does, e.g. the pooled ceiling, which serves every
    domain). test_accuracy is the mean rank-1 over domains, test_loss the mean of 1 - mAP (a retrieval run has no
    test cross-entropy: its test identities are not classes of the model), domain_accuracy / domain_map each
    domain's rank-1 and mAP."""
    data = run.ctx.data
    tests = run.client_tests  # also sets run.unit_client
    cams, query = data.extra["test_camera"], data.extra["test_query"]
    r1, maps = {}, {}
    for d, name in enumerate(data.domains):
        idx = tests[d].cpu()
        feats = extract_features(model_for_client(run.unit_client[d]), run.x_test[tests[d]])
        q = query[idx]
        ids, cam = data.test.y[idx].numpy(), cams[idx].numpy()
        m = retrieval_metrics(feats[q], ids[q.numpy()], cam[q.numpy()], feats[~q], ids[~q.numpy()], cam[~q.numpy()])
        r1[name], maps[name] = m["rank1"], m["map"]
    return {"test_accuracy": float(np.mean(list(r1.values()))),
            "test_loss": float(np.mean([1 - v for v in maps.values()])),
            "domain_accuracy": r1, "domain_map": maps}
