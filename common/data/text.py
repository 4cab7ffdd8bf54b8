"""Text-classification corpora read from `data_root` in their distributed layouts (paper scale; nothing is
downloaded, and no offline text set ships with the installed packages, so there is no mini analog).

- `imdb`: the Large Movie Review Dataset as extracted from aclImdb_v1.tar.gz:
  `<data_root>/aclImdb/{train,test}/{neg,pos}/*.txt` (labels: neg 0, pos 1).
- `trec6`: the TREC question-classification set: `<data_root>/trec/train_5500.label` and `TREC_10.label`, one
  question per line as `COARSE:fine question ...`; the six coarse classes are the labels (ABBR, DESC, ENTY, HUM,
  LOC, NUM).

A sample is its text as token ids: lower-cased word and punctuation tokens, a vocabulary of the training split's
`VOCABULARY` most frequent tokens (ties by first occurrence; 0 = padding, 1 = unknown), cut or padded to a fixed
length (IMDB 400, TREC 40). `Split.x` is then int64 (N, length): a text model embeds it.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from common.data import Dataset, Split, register
from common.errors import DatasetCorrupt, DatasetMissing

VOCABULARY = 20_000
PAD, UNKNOWN = 0, 1
TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
IMDB_DIR, IMDB_LENGTH = "aclImdb", 400
IMDB_HOWTO = ("Download aclImdb_v1.tar.gz from https://ai.stanford.edu/~amaas/data/sentiment/ on a machine with "
              "internet access and extract it into data_root (giving <data_root>/aclImdb/train/pos/*.txt)")
TREC_DIR, TREC_FILES, TREC_LENGTH = "trec", ("train_5500.label", "TREC_10.label"), 40
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TREC_HOWTO = ("Download train_5500.label and TREC_10.label from https://cogcomp.seas.upenn.edu/Data/QA/QC/ on a "
              "machine with internet access into <data_root>/trec/")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def encode(train: list[str], test: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, length) of both splits with the training split's vocabulary."""
    train_tokens = [tokens(t) for t in train]
    counts = Counter(tok for toks in train_tokens for tok in toks)
    vocab = {tok: i + 2 for i, (tok, _) in enumerate(counts.most_common(VOCABULARY - 2))}

    def ids(toks: list[str]) -> list[int]:
        out = [vocab.get(tok, UNKNOWN) for tok in toks[:length]]
        return out + [PAD] * (length - len(out))
    return (torch.tensor([ids(t) for t in train_tokens], dtype=torch.int64).reshape(len(train), length),
            torch.tensor([ids(tokens(t)) for t in test], dtype=torch.int64).reshape(len(test), length))


def missing_files(name: str, root: Path) -> list[str]:
    if name == "imdb":
        folders = [root / IMDB_DIR / s / c for s in ("train", "test") for c in ("neg", "pos")]
        return [str(f) + "/" for f in folders if not (f.is_dir() and any(f.glob("*.txt")))]
    if name == "trec6":
        return [str(root / TREC_DIR / f) for f in TREC_FILES if not (root / TREC_DIR / f).is_file()]
    return []


def _require(name: str, root: Path, howto: str) -> None:
    missing = missing_files(name, root)
    if missing:
        raise DatasetMissing(f"{name} is not in data_root '{root}': missing {', '.join(missing)}. {howto}.")


def _dataset(name: str, train: tuple[list, list], test: tuple[list, list], length: int, classes: int,
             description: str) -> Dataset:
    x_train, x_test = encode(train[0], test[0], length)
    return Dataset(name, Split(x_train, torch.tensor(train[1], dtype=torch.int64)),
                   Split(x_test, torch.tensor(test[1], dtype=torch.int64)), classes, description)


@register("imdb")
def imdb(root: Path) -> Dataset:
    _require("imdb", root, IMDB_HOWTO)

    def read(split: str) -> tuple[list, list]:
        texts, labels = [], []
        for label, folder in enumerate(("neg", "pos")):
            for path in sorted((root / IMDB_DIR / split / folder).glob("*.txt")):
                try:
                    texts.append(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError) as e:
                    raise DatasetCorrupt(f"cannot read review {path} ({e}); re-extract it") from None
                labels.append(label)
        return texts, labels
    return _dataset("imdb", read("train"), read("test"), IMDB_LENGTH, 2,
                    f"IMDB reviews from {root / IMDB_DIR}, {IMDB_LENGTH} token ids per review")


@register("trec6")
def trec6(root: Path) -> Dataset:
    _require("trec6", root, TREC_HOWTO)

    def read(file: str) -> tuple[list, list]:
        texts, labels = [], []
        path = root / TREC_DIR / file
        for n, line in enumerate(path.read_bytes().decode("latin-1").splitlines(), start=1):
            if not line.strip():
                continue
            label, _, question = line.partition(" ")
            coarse = label.split(":")[0]
            if coarse not in TREC_CLASSES or not question:
                raise DatasetCorrupt(f"{path}, line {n}: expected 'COARSE:fine question', got {line[:60]!r}")
            texts.append(question)
            labels.append(TREC_CLASSES.index(coarse))
        return texts, labels
    return _dataset("trec6", read(TREC_FILES[0]), read(TREC_FILES[1]), TREC_LENGTH, len(TREC_CLASSES),
                    f"TREC-6 questions from {root / TREC_DIR}, {TREC_LENGTH} token ids per question")
