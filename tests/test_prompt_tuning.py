"""Prompt tuning (papers/prompt_tuning): the soft prompt, what trains, the ensemble vote, the templated reviews,
and paper-scale loading (SuperGLUE through `datasets`, a T5 checkpoint) on files the tests write."""
import json
import re

import numpy as np
import pytest
import torch

from common.data import load_dataset, train_test_overlap
from common.data.text import LABEL_WORDS, NEGATIVE, NEGATORS, POSITIVE, generate_reviews, review
from common.errors import SuiteError
from common.fl import FederatedRun, RunContext, get_algorithm
from common.models import build_model
from common.models.text import PAD_ID, load_tokenizer
from common.train import execute, load_data_and_partition, model_factory
from papers.prompt_tuning.method import common_tokens, initial_prompt, majority_vote

torch.set_num_threads(1)


def spec(method: dict, layers: int = 1, rounds: int = 1, seed: int = 0, **training) -> dict:
    return {"dataset": {"name": "reviews", "train_limit": 32, "test_limit": 16},
            "partition": {"scheme": "iid", "clients": 1},
            "model": {"name": "pretrained_encoder", "checkpoint": "minilm-l6", "layers": layers},
            "method": method,
            "training": {"rounds": rounds, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 8, "lr": 0.05,
                         "optimizer": "adamw", **training},
            "seed": seed}


PROMPT = {"name": "prompt_tuning", "length": 3, "init": "class_labels"}


def set_up(s: dict):
    """The run context and algorithm of a spec after the algorithm's set-up (what trains is decided there)."""
    data, parts = load_data_and_partition(s, "data")
    make_model = model_factory(s, data, torch.device("cpu"))
    torch.manual_seed(s["seed"])
    ctx = RunContext(spec=s, data=data, parts=parts, model=make_model(), make_model=make_model,
                     device=torch.device("cpu"), data_root="data")
    algo = get_algorithm(s["method"])
    algo.setup(ctx)
    return ctx, algo


# --- the soft prompt -----------------------------------------------------------------------------------------
def test_prompt_is_prepended_to_the_input_embeddings_with_the_mask_extended():
    """The model's pooled output equals an independent computation: the encoder run on [prompt; token embeddings]
    through inputs_embeds with the attention mask extended by ones, averaged over the unmasked positions."""
    torch.manual_seed(0)
    model = build_model("pretrained_encoder", 27, 2, 27, checkpoint="minilm-l6", layers=2).eval()
    prompt = torch.randn(4, 384) * 0.05
    model.features.set_prompt(prompt)
    ids = load_dataset("reviews").test.x[:3]
    enc = model.features.encoder
    with torch.no_grad():
        ours = model.features(ids)
        mask = (ids != PAD_ID).float()
        embeds = torch.cat([prompt.expand(3, -1, -1), enc.embeddings.word_embeddings(ids)], 1)
        full_mask = torch.cat([torch.ones(3, 4), mask], 1)
        hidden = enc(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
        expected = (hidden * full_mask[..., None]).sum(1) / full_mask.sum(1, keepdim=True)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert len(enc.encoder.layer) == 2


def test_the_prompt_changes_the_models_output_and_padding_does_not():
    torch.manual_seed(0)
    model = build_model("pretrained_encoder", 27, 2, 27, checkpoint="minilm-l6", layers=2).eval()
    ids = load_dataset("reviews").test.x[:4]
    with torch.no_grad():
        plain = model(ids)
        padded = model(torch.cat([ids, torch.zeros(4, 5, dtype=ids.dtype)], 1))
        model.features.set_prompt(torch.randn(3, 384) * 0.05)
        prompted = model(ids)
        model.features.set_prompt(torch.randn(3, 384) * 0.05)
        other = model(ids)
    torch.testing.assert_close(plain, padded, rtol=1e-5, atol=1e-6)
    assert (prompted - plain).abs().max() > 1e-3 and (prompted - other).abs().max() > 1e-3


def test_prompt_initialisations_follow_the_paper():
    tok = load_tokenizer("minilm-l6")
    emb = torch.randn(tok.vocab_size, 8)
    vocab = common_tokens(tok)
    words = [tok.convert_ids_to_tokens(int(i)) for i in vocab[:5]]
    assert len(vocab) == 5000 and words[0] == "the" and all(w.isalpha() for w in words)
    labels = [tok(w, add_special_tokens=False)["input_ids"] for w in ("negative", "unfriendliness")]
    assert len(labels[1]) > 1  # a label of several word pieces: the mean of their embeddings
    gen = torch.Generator().manual_seed(0)
    p = initial_prompt(emb, 6, "class_labels", gen, vocab, labels)
    torch.testing.assert_close(p[0], emb[labels[0][0]])
    torch.testing.assert_close(p[1], emb[labels[1]].mean(0))
    assert all(any(torch.equal(row, emb[i]) for i in vocab.tolist()) for row in p[2:])
    v = initial_prompt(emb, 6, "vocab", torch.Generator().manual_seed(0), vocab, labels)
    assert all(any(torch.equal(row, emb[i]) for i in vocab.tolist()) for row in v)
    r = initial_prompt(emb, 6, "random", torch.Generator().manual_seed(0))
    assert r.shape == (6, 8) and r.min() >= -0.5 and r.max() <= 0.5
    with pytest.raises(SuiteError, match="unknown prompt initialisation"):
        initial_prompt(emb, 6, "zeros", gen, vocab, labels)


# --- what trains ----------------------------------------------------------------------------------------------
def test_only_the_prompt_and_the_head_receive_gradients():
    ctx, _ = set_up(spec(PROMPT))
    model = ctx.model
    x, y = ctx.data.train.x[:8], ctx.data.train.y[:8]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"features.prompt", "head.weight", "head.bias"}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in got)
    assert model.features.prompt.shape == (3, 384)


def test_prompt_design_trains_only_the_head_behind_a_fixed_text_prompt():
    ctx, _ = set_up(spec({"name": "prompt_design", "text": "is this positive or negative?"}))
    tok = load_tokenizer("minilm-l6")
    ids = tok("is this positive or negative?", add_special_tokens=False)["input_ids"]
    emb = ctx.model.features.encoder.get_input_embeddings().weight
    assert torch.equal(ctx.model.features.prompt.detach(), emb[ids].detach())
    assert {n for n, p in ctx.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def _final_state(s, tmp_path):
    path = tmp_path / "model.pt"
    result = execute(s, progress=False, model_out=path)
    return result, torch.load(path, weights_only=True)["state_dict"]


def test_frozen_weights_are_bit_identical_after_prompt_tuning(tmp_path):
    s = spec(PROMPT, rounds=2)
    result, final = _final_state(s, tmp_path)
    ctx, _ = set_up(s)
    initial = ctx.model.state_dict()
    frozen = [k for k in initial if not k.startswith(("features.prompt", "head."))]
    assert len(frozen) > 20 and all(torch.equal(final[k], initial[k]) for k in frozen)
    assert not torch.equal(final["features.prompt"], initial["features.prompt"])
    assert not torch.equal(final["head.weight"], initial["head.weight"])
    # the counts in the results are those of the model: prompt (3 x 384) and head (384 x 2 + 2) train
    assert result["model"]["trainable_parameters"] == 3 * 384 + 384 * 2 + 2
    assert result["model"]["parameters"] == sum(v.numel() for k, v in final.items() if "position_ids" not in k)


def test_model_tuning_trains_every_weight(tmp_path):
    result, final = _final_state(spec({"name": "centralised"}, lr=1e-3), tmp_path)
    assert result["model"]["trainable_parameters"] == result["model"]["parameters"]
    ctx, _ = set_up(spec({"name": "centralised"}, lr=1e-3))
    initial = ctx.model.state_dict()
    changed = [k for k in initial if not torch.equal(final[k], initial[k])]
    assert "features.encoder.encoder.layer.0.attention.self.query.weight" in changed


@pytest.mark.parametrize("optimizer,kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW),
                                            ("adafactor", torch.optim.Adafactor)])
def test_the_local_optimiser_is_the_specs_and_sees_only_trainable_parameters(optimizer, kind):
    s = spec(PROMPT, optimizer=optimizer)
    ctx, algo = set_up(s)
    opt = FederatedRun(ctx, algo).make_optimizer(ctx.model, 0.3)
    assert isinstance(opt, kind) and sum(len(g["params"]) for g in opt.param_groups) == 3


# --- the ensemble ---------------------------------------------------------------------------------------------
def test_majority_vote_on_hand_made_predictions():
    preds = torch.tensor([[0, 1, 2, 1, 2],
                          [1, 1, 2, 0, 0],
                          [1, 0, 0, 0, 1]])
    assert majority_vote(preds, 3).tolist() == [1, 1, 2, 0, 0]  # the last column is a three-way tie: class 0
    assert majority_vote(torch.tensor([[0, 1], [1, 0]]), 2).tolist() == [0, 0]  # ties go to the smallest class
    assert majority_vote(torch.tensor([[2, 2, 1]]), 3).tolist() == [2, 2, 1]  # one member: its predictions


def test_ensemble_members_are_independent_and_the_vote_is_what_is_reported(tmp_path):
    s = spec({"name": "prompt_ensemble", "members": 3, "length": 3, "init": "class_labels"})
    ctx, algo = set_up(s)
    prompts = [algo.local[m]["features.prompt"] for m in range(3)]
    heads = [algo.local[m]["head.weight"] for m in range(3)]
    assert not torch.equal(prompts[0], prompts[1]) and not torch.equal(heads[1], heads[2])
    # class-label initialisation: the first two vectors are the label words' embeddings in every member
    assert all(torch.equal(p[:2], prompts[0][:2]) for p in prompts)
    assert len(ctx.parts) == 3 and all(torch.equal(p, ctx.parts[0]) for p in ctx.parts)
    result = execute(s, progress=False)
    m = result["metrics"]
    members = m["member_accuracy"][-1]
    assert len(members) == 3 and m["member_mean"][-1] == pytest.approx(np.mean(members))
    assert m["member_best"][-1] == max(members)
    assert result["model"]["trainable_parameters"] == 3 * 384 + 384 * 2 + 2


# --- the templated reviews ------------------------------------------------------------------------------------
def label_of(text: str) -> int:
    """An independent reading of a review's polarity: each clause's adjective, flipped by a negator; in a contrast
    the main clause decides, and "i would not say that A" is A flipped."""
    def clause(c: str) -> int:
        words = c.split()
        adjective = words[-1]
        polarity = 1 if adjective in POSITIVE else 0 if adjective in NEGATIVE else None
        assert polarity is not None, c
        negated = any(f" {n} " in f" {c} " for n in NEGATORS)
        return polarity ^ negated

    body = re.sub(r"^(honestly|to be fair|overall|in short|frankly), ", "", text.rstrip("."))
    if body.startswith("i would not say that "):
        return 1 - clause(body[len("i would not say that "):])
    if body.startswith("although "):
        return clause(body.split(", ", 1)[1])
    if ", but " in body:
        return clause(body.split(", but ")[1])
    if ", even though " in body:
        return clause(body.split(", even though ")[0])
    if " and " in body:
        a, b = body.split(" and ")
        assert clause(a) == clause(b)
        return clause(a)
    return clause(body)


def test_reviews_are_labelled_by_their_grammar():
    texts, y = generate_reviews(400, seed=7)
    assert [label_of(t) for t in texts] == y.tolist()
    rng = np.random.default_rng(1)
    assert all(label_of(review(rng, label)) == label for label in (0, 1) * 50)


def test_reviews_dataset_is_fixed_balanced_and_has_no_leak():
    a, b = load_dataset("reviews"), load_dataset("reviews")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert len(a.train) == 2400 and len(a.test) == 600 and a.num_classes == 2
    assert a.train.y.float().mean() == 0.5 and a.test.y.float().mean() == 0.5
    assert train_test_overlap(a) == 0 and not set(a.extra["texts"]["train"]) & set(a.extra["texts"]["test"])
    assert a.extra["label_words"] == list(LABEL_WORDS)
    tok = load_tokenizer("minilm-l6")
    first = tok.decode([i for i in a.test.x[0].tolist() if i != PAD_ID], skip_special_tokens=True)
    assert first == a.extra["texts"]["test"][0].replace(",", " ,").replace(".", " .").replace("  ", " ").strip() \
        or first.replace(" ", "") == a.extra["texts"]["test"][0].replace(" ", "")


# --- paper scale: SuperGLUE through `datasets`, a T5 checkpoint, from local files -----------------------------
@pytest.fixture(scope="module")
def paper_root(tmp_path_factory):
    """A data_root as the paper scale expects it: SuperGLUE BoolQ files and a (tiny, random) T5 v1.1 checkpoint
    with a tokenizer, written by save_pretrained."""
    from transformers import T5Config, T5EncoderModel
    root = tmp_path_factory.mktemp("paper_data")
    boolq = root / "super_glue" / "BoolQ"
    boolq.mkdir(parents=True)
    rows = [{"question": f"is question {i} true", "passage": f"passage number {i}.", "idx": i, "label": i % 2 == 0}
            for i in range(6)]
    (boolq / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n")
    (boolq / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[4:]) + "\n")
    tok = load_tokenizer("minilm-l6")
    for size in ("small", "base"):
        folder = root / "t5-v1_1-lm-adapt" / size
        torch.manual_seed(0)
        config = T5Config(vocab_size=tok.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                          feed_forward_proj="gated-gelu", pad_token_id=0)
        T5EncoderModel(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    return root


def test_superglue_loads_through_datasets_from_local_files(paper_root):
    ds = load_dataset("superglue_boolq", paper_root)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (4, 2, 2)
    assert ds.train.y.tolist() == [1, 0, 1, 0] and ds.test.y.tolist() == [1, 0]  # True is class 1
    assert ds.extra["texts"]["train"][0] == "boolq question: is question 0 true passage: passage number 0."
    assert ds.train.x.dtype == torch.int64 and (ds.train.x[:, 0] != PAD_ID).all()


def test_a_t5_checkpoint_loads_as_its_encoder_and_takes_a_prompt(paper_root):
    from transformers import T5EncoderModel
    torch.manual_seed(0)
    model = build_model("pretrained_encoder", 8, 2, 8, data_root=str(paper_root),
                        checkpoint="t5-v1_1-lm-adapt/base", layers=1)
    assert isinstance(model.features.encoder, T5EncoderModel) and len(model.features.encoder.encoder.block) == 1
    ids = load_dataset("superglue_boolq", paper_root).train.x
    plain = model(ids)
    model.features.set_prompt(torch.randn(2, 16))
    assert plain.shape == (4, 2) and not torch.allclose(plain, model(ids))


def test_missing_paper_files_are_named(tmp_path):
    from common.data import missing_files
    from common.models.text import missing_files as missing_checkpoint_files
    with pytest.raises(SuiteError, match=r"super_glue/BoolQ/train.jsonl"):
        load_dataset("superglue_boolq", tmp_path)
    assert str(tmp_path / "super_glue" / "BoolQ" / "val.jsonl") in missing_files("superglue_boolq", tmp_path)
    model = {"name": "pretrained_encoder", "checkpoint": "t5-v1_1-lm-adapt/xxl"}
    assert missing_checkpoint_files(model, tmp_path) == [str(tmp_path / "t5-v1_1-lm-adapt/xxl/config.json")]
    assert missing_checkpoint_files({"name": "pretrained_encoder", "checkpoint": "minilm-l6"}, tmp_path) == []
    with pytest.raises(SuiteError, match="nothing is downloaded"):
        build_model("pretrained_encoder", 8, 2, 8, data_root=str(tmp_path), checkpoint="t5-v1_1-lm-adapt/xxl")
