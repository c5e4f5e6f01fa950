"""Retrieval learns without retrieval labels: the right passage's p(z|x) rises (issue 16).

The toy world's 8 facts, every passage a candidate (K = 8), a random tiny query encoder. A
generator trained from scratch on 8 question-answer pairs would memorise the answers from the
questions, and then nothing pushes p(z|x) anywhere. So, as the main job does, the generator
first learns to read: closed-book, input "title / text // question" -> the title, where each
passage is paired with every one of the 8 questions alike. It learns to name a passage's
entity and to ignore the question, and it learns nothing about which passage answers which
question. RAG training then moves the query encoder (the generator at a hundredth of its
learning rate) through the marginal p(y|x) alone (eq. 1 and 2): the passage whose reading
gives the answer gains p(z|x), for every question.
"""

import json
import shutil

import numpy as np
import pytest

from rag_jax.builders import build_model
from rag_jax.checkpoints import load_trained
from rag_jax.evaluation import EvalSettings, Evaluator
from rag_jax.index import KnowledgeSource
from rag_jax.models import save_bart
from rag_jax.training import train
from tests.toy import FACTS, MINILM_DIR, TOKENIZER_FILES, read_metrics, tiny_config


@pytest.fixture(scope="module")
def reader(toy, tmp_path_factory):
    """A tiny BART that names the entity of a toy passage whatever question follows it."""
    root = tmp_path_factory.mktemp("reader")
    with open(root / "warmup.jsonl", "w") as f:
        for title, text, _ in FACTS:
            for _, _, question in FACTS:  # every question alike: no retrieval label
                line = {"question": f"{title} / {text} // {question}", "answers": [title]}
                f.write(json.dumps(line) + "\n")
    config = tiny_config(
        toy,
        **{
            "rag.marginalization": "closed_book",
            "data.train": str(root / "warmup.jsonl"),
            "batch_size": 16,
            "train_steps": 80,
            "optimizer.decay_steps": 0,
        },
    )
    train(config, str(root / "run"))
    losses = [m["loss"] for m in read_metrics(root / "run")]
    assert losses[-1] < 0.02 * losses[0]  # it reads every toy passage
    model, _, _ = load_trained(config, str(root / "run"))
    save_bart(model.generator, root / "generator")
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, root / "generator" / name)
    return root / "generator"


def right_passage_probs(model, tokenizers, toy) -> np.ndarray:
    """p(z|x) of each toy question's own passage, over all 8 passages: (8,)."""
    settings = EvalSettings(retrieval_only=True, batch_size=len(FACTS))
    evaluator = Evaluator(model, *tokenizers, KnowledgeSource(toy / "index"), settings)
    records = evaluator.answer([question for _, _, question in FACTS])
    return np.array(
        [
            sum(p for t, p in zip(r["titles"], r["doc_probs"], strict=False) if t == title)
            for r, (title, _, _) in zip(records, FACTS, strict=True)
        ]
    )


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_the_right_passages_probability_rises(toy, reader, tmp_path, marginalization):
    config = tiny_config(
        toy,
        **{
            "rag.marginalization": marginalization,
            "model.generator": str(reader),
            "train_steps": 60,
            "optimizer.decay_steps": 0,
            "optimizer.learning_rate": 1e-2,
            "optimizer.generator_lr_factor": 0.01,  # the generator already reads
        },
    )
    model, *tokenizers = build_model(config)
    before = right_passage_probs(model, tokenizers, toy)
    assert np.all(before < 0.3)  # the random query encoder: about 1/8 each
    train(config, str(tmp_path / "run"))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert losses[-1] < 0.5 * losses[0]
    model, *tokenizers = load_trained(config, str(tmp_path / "run"))
    after = right_passage_probs(model, tokenizers, toy)
    assert np.all(after > before + 0.2), (before, after)  # every question, not on average
    assert after.mean() > 0.5, (before, after)
