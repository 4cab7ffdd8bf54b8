"""Communication accounting: the bytes each client uploads and downloads in a round, counted from what is sent.

The engine asks the algorithm, for every sampled client of every round, how many bytes the client received
(`Algorithm.download_bytes`) and sent (`Algorithm.upload_bytes`), and logs them per round in the results file
(`clients`, `bytes_down`, `bytes_up`: one entry per sampled client, in the order of `clients`). Algorithms count
with the encodings below, so every paper counts the same way:

- a dense tensor: its number of entries times the size of its dtype (float32: 4 bytes, int64: 8 bytes);
- a sparse tensor: its kept entries times (INDEX_BYTES + the value's size): each kept entry travels as a
  (position, value) pair, the position an unsigned 32-bit integer into the flattened tensor;
- distilled data (synthetic inputs, their labels and learned learning rates): dense tensors in the dtype they are
  sent in (labels as one byte each, LABEL_BYTES; at most 256 classes).

Nothing here is an estimate: the counts are the sizes of the tensors (or kept entries) that the algorithm transmits.
Message headers, shapes and protocol overhead are not counted (a constant per message, the same for every method).
"""
from __future__ import annotations

from typing import Iterable

import torch

INDEX_BYTES = 4  # a position within a flattened tensor, as an unsigned 32-bit integer (tensors < 2^32 entries)
LABEL_BYTES = 1  # a class label (uint8)


def dense_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of `tensors` sent densely: entries times element size."""
    return sum(t.numel() * t.element_size() for t in tensors)


def sparse_bytes(kept: int, value_bytes: int = 4, index_bytes: int = INDEX_BYTES) -> int:
    """Bytes of `kept` entries of a tensor sent as (index, value) pairs."""
    return kept * (index_bytes + value_bytes)


def state_bytes(state: dict[str, torch.Tensor], keys: Iterable[str] | None = None) -> int:
    """Bytes of the entries `keys` (default: all) of a model state sent densely."""
    return dense_bytes(state[k] for k in (state if keys is None else keys))
