"""Prompt tuning (Lester, Al-Rfou, Constant, EMNLP 2021) on a frozen pretrained encoder, prompt design, and
prompt ensembles, as algorithms of the shared engine trained centrally (one client holding the pooled data, like
the suite's `centralised` ceiling, which is this paper's model tuning: every weight trains).

- `prompt_tuning`: k soft-prompt vectors (`common/models/text.py`, prepended to the input embeddings) and the
  classification head train; every pretrained weight is frozen (requires_grad off, so it gets no gradient and
  the optimiser never sees it). The prompt is initialised as in the paper's Sec. 3.2: `class_labels` (each of the
  first vectors is the embedding of one class's label word, averaged over its word pieces; the rest are sampled
  from the vocabulary), `vocab` (embeddings of tokens sampled from the 5,000 most common whole-word tokens) or
  `random` (uniform in [-0.5, 0.5]).
- `prompt_design`: a fixed hand-written prompt (the embeddings of `text`'s tokens) on the frozen model; only the
  head trains (a text-to-text model needs no head; a classifier on an encoder does).
- `prompt_ensemble`: `members` prompts trained independently on the same frozen model (each its own prompt
  initialisation, head initialisation and batch order), evaluated by majority vote of their predictions; it logs
  each member's accuracy, their mean and the best of them (the paper's Table "Average / Best / Ensemble").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import SuiteError
from common.fl.algorithms import Centralised, register_algorithm
from common.fl.engine import sub_seed
from common.fl.personal import LocalEntries

VOCAB_SAMPLE = 5000  # the paper samples "from the 5,000 most common tokens"
PROMPT_INITS = ("class_labels", "vocab", "random")


def trainable_only(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Freeze every parameter of `model` except those whose name starts with one of `names`."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(names))


def common_tokens(tokenizer, n: int = VOCAB_SAMPLE) -> torch.Tensor:
    """Ids of the first `n` whole-word tokens of the vocabulary in id order (WordPiece and SentencePiece vocabularies
    list frequent words first): alphabetic, longer than one letter, not special, not a word-piece continuation."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tokenizer.all_special_ids)
    ids = [i for tok, i in vocab if i not in special and len(tok.lstrip("▁")) > 1 and tok.lstrip("▁").isalpha()]
    return torch.tensor(ids[:n])


def initial_prompt(embeddings: torch.Tensor, length: int, how: str, generator: torch.Generator,
                   vocab_ids: torch.Tensor | None = None, label_ids: list[list[int]] | None = None) -> torch.Tensor:
    """A (length, width) soft prompt from the embedding matrix (vocab, width), initialised as `how`."""
    width = embeddings.shape[1]
    if how == "random":
        return torch.rand(length, width, generator=generator) - 0.5
    if how not in PROMPT_INITS:
        raise SuiteError(f"unknown prompt initialisation '{how}'; use one of {', '.join(PROMPT_INITS)}")
    rows = embeddings[vocab_ids[torch.randint(len(vocab_ids), (length,), generator=generator)]].clone()
    if how == "class_labels":
        for k, ids in enumerate(label_ids[:length]):
            rows[k] = embeddings[ids].mean(0)
    return rows


def majority_vote(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The most frequent class per column of (members, N) predicted classes; a tie goes to the smallest class."""
    counts = F.one_hot(predictions, num_classes).sum(0)  # (N, classes)
    return counts.argmax(1)  # argmax returns the first maximum


class FrozenEncoder(Centralised):
    """Centralised training of only `trainable` parameters of a pretrained encoder with a classifier head."""
    trainable: tuple[str, ...] = ("head.",)

    def setup(self, ctx):
        features = ctx.model.features
        if not hasattr(features, "set_prompt"):
            raise SuiteError(f"method '{self.name}' needs a pretrained encoder (model pretrained_encoder), "
                             f"not '{ctx.spec['model']['name']}'")
        self.add_prompt(ctx)
        trainable_only(ctx.model, self.trainable)
        super().setup(ctx)

    def add_prompt(self, ctx) -> None:
        """Give the model its prompt before the engine records the initial state."""

    def tokenizer(self, ctx):
        from common.models.text import load_tokenizer
        return load_tokenizer(ctx.spec["model"].get("checkpoint", "minilm-l6"), ctx.data_root)


@register_algorithm("prompt_design")
class PromptDesign(FrozenEncoder):
    def __init__(self, text: str = "", server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.text = text

    def add_prompt(self, ctx):
        if self.text:
            ids = self.tokenizer(ctx)(self.text, add_special_tokens=False)["input_ids"]
            ctx.model.features.set_prompt(ctx.model.features.encoder.get_input_embeddings().weight[ids])


@register_algorithm("prompt_tuning")
class PromptTuning(FrozenEncoder):
    trainable = ("features.prompt", "head.")

    def __init__(self, length: int = 100, init: str = "class_labels", server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if init not in PROMPT_INITS:
            raise SuiteError(f"unknown prompt initialisation '{init}'; use one of {', '.join(PROMPT_INITS)}")
        self.length, self.init = length, init

    def new_prompt(self, ctx, member: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(sub_seed(ctx.spec["seed"], 0x50F7, member))
        emb = ctx.model.features.encoder.get_input_embeddings().weight.detach().cpu()
        vocab_ids = label_ids = None
        if self.init != "random":
            tok = self.tokenizer(ctx)
            vocab_ids = common_tokens(tok)
            label_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in ctx.data.extra["label_words"]]
        return initial_prompt(emb, self.length, self.init, gen, vocab_ids, label_ids)

    def add_prompt(self, ctx):
        ctx.model.features.set_prompt(self.new_prompt(ctx))


@register_algorithm("prompt_ensemble")
class PromptEnsemble(LocalEntries, PromptTuning):
    """`members` prompt-tuning runs on one frozen model: each member is a client holding all the training data and
    keeping its prompt and head (LocalEntries); nothing else trains, so the server has nothing to average."""

    def __init__(self, members: int = 5, length: int = 100, init: str = "class_labels", server_lr: float = 1.0):
        PromptTuning.__init__(self, length=length, init=init, server_lr=server_lr)
        self.members = members

    def is_local(self, model, key):
        return key.startswith(self.trainable)

    def setup(self, ctx):
        super().setup(ctx)  # LocalEntries' set-up around PromptTuning's: prompt, freezing, the pooled data
        ctx.parts[:] = [ctx.parts[0]] * self.members
        model = ctx.model
        for m in range(self.members):  # each member's own prompt and head initialisation
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sub_seed(ctx.spec["seed"], 0xE45E, m))
                model.head.reset_parameters()
            model.features.set_prompt(self.new_prompt(ctx, member=m))
            state = model.state_dict()
            self.local[m] = {k: state[k].detach().clone() for k in self.local_keys}
        trainable_only(model, self.trainable)  # set_prompt made a new parameter

    def server_update(self, global_state, client_states, weights, round_index):
        return dict(global_state)

    @torch.no_grad()
    def evaluate(self, run, global_state):
        model = run.ctx.model
        model.eval()
        logits = []
        for m in range(self.members):
            model.load_state_dict(self.client_state(global_state, m))
            logits.append(torch.cat([model(run.x_test[i:i + 500]) for i in range(0, len(run.y_test), 500)]))
        logits = torch.stack(logits)  # (members, N, classes)
        y = run.y_test
        member_acc = [(lg.argmax(1) == y).double().mean().item() for lg in logits]
        vote = majority_vote(logits.argmax(2), logits.shape[2])
        losses = [F.cross_entropy(lg, y).item() for lg in logits]
        return {"test_accuracy": (vote == y).double().mean().item(), "test_loss": sum(losses) / len(losses),
                "member_accuracy": member_acc, "member_mean": sum(member_acc) / len(member_acc),
                "member_best": max(member_acc)}
