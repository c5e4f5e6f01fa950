"""The retrieval-collapse watch: each sign warns on the figures that show it, and only then."""

import logging

import pytest

from configs import tiny
from rag_jax.metric_writer import watch_collapse
from rag_jax.rag import RagConfig

K = 4


def metrics(entropy=1.0, distinct=40, retrieved=200):
    return dict(
        doc_entropy=entropy, distinct_docs_in_window=distinct, retrieved_in_window=retrieved
    )


@pytest.fixture
def config():
    config = tiny.get_config()
    assert (config.collapse.min_entropy, config.collapse.min_distinct_docs) == (0.05, 2)
    return config


def test_one_fixed_set_of_documents_for_every_question_warns_whatever_the_thresholds(
    config, caplog
):
    """The newcomer's collapse: 50 questions x K=4 documents, all the same 4 of 200 passages,
    p(z|x) near uniform over them (entropy ~log 4): neither threshold fires, this sign does."""
    model = RagConfig(n_docs=K)
    with caplog.at_level(logging.WARNING):
        warnings = watch_collapse(metrics(1.38, 4, 200), config, model, n_passages=200)
    assert len(warnings) == 1 and "50 questions all retrieved the same 4" in warnings[0]
    assert "200 documents" in caplog.text
    # healthy: 40 distinct documents over the window
    assert watch_collapse(metrics(1.38, 40, 200), config, model, n_passages=200) == []
    # an index of K passages: every question must retrieve all of them
    assert watch_collapse(metrics(1.38, 4, 200), config, model, n_passages=4) == []
    # one question's documents so far: nothing to compare yet
    assert watch_collapse(metrics(1.38, 4, 4), config, model, n_passages=200) == []


def test_the_thresholds_fire_below_them_and_closed_book_is_never_watched(config):
    model = RagConfig(n_docs=K)
    low_entropy = watch_collapse(metrics(entropy=0.01), config, model, n_passages=200)
    assert len(low_entropy) == 1 and "entropy of p(z|x) is 0.010" in low_entropy[0]
    config.collapse.min_distinct_docs = 50
    few = watch_collapse(metrics(distinct=40), config, model, n_passages=200)
    assert len(few) == 1 and "only 40 distinct documents over the last 200" in few[0]
    assert watch_collapse(metrics(entropy=0.0, distinct=1), config, RagConfig(n_docs=1,
        marginalization="closed_book")) == []  # fmt: skip
