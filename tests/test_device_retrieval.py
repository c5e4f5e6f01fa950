"""Retrieval inside the jitted train step (``config.data.retrieval="device"``): the same
retrieved ids, generator inputs and losses as retrieval on the host, on the toy index sharded
over the 4 test devices."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from rag_jax import device_retrieval
from rag_jax.builders import build_model, open_knowledge
from rag_jax.data import QAExample, read_qa
from rag_jax.host_retrieval import BatchBuilder
from rag_jax.index import KnowledgeSource, build_index, load_text_encoder
from rag_jax.sharding import make_mesh
from rag_jax.training import train
from tests.toy import ON_MESH, read_metrics, tiny_config


@pytest.fixture(scope="module")
def world(toy):
    config = tiny_config(toy, **{"rag.n_docs": 4}, **ON_MESH)  # the index's rows split
    return config, *build_model(config)


@pytest.mark.parametrize("context_length", [48, 14])  # 14: every passage is cut
def test_device_batch_equals_host_batch(world, context_length):
    config, model, question_tokenizer, generator_tokenizer = world
    rag = dataclasses.replace(model.config, max_context_length=context_length)
    mesh = make_mesh(config)

    def builder(knowledge: KnowledgeSource) -> BatchBuilder:
        return BatchBuilder(
            rag, question_tokenizer, generator_tokenizer, model.generator.config,
            knowledge=knowledge, embed_fn=model.embed_questions,
            question_vocab_size=model.query_encoder.bert.config.vocab_size,
        )  # fmt: skip

    examples, _ = read_qa(config.data.train)
    # a question longer than S: the question itself is cut, the passage dropped
    examples.append(QAExample(" ".join(["river"] * 20), ("Quelf",)))
    examples = examples[:4] + examples[-4:]  # B = 8, splits over the 4 devices
    host = builder(open_knowledge(config, model))(examples)

    on_device = builder(open_knowledge(config, model, mesh))
    corpus = device_retrieval.corpus_from_knowledge(
        on_device.knowledge, on_device, examples[0].question
    )
    assert corpus.index.embeddings.sharding.mesh == mesh  # rows split over the devices
    questions, n_truncated = device_retrieval.question_batch(
        examples, on_device, on_device.knowledge.passages(0)
    )

    @nnx.jit
    def retrieve(query_encoder, corpus, questions):
        return device_retrieval.retrieve(query_encoder, corpus, questions, rag)

    with jax.set_mesh(mesh):
        batch, doc_ids, n_cut = retrieve(model.query_encoder, corpus, questions)
    np.testing.assert_array_equal(np.asarray(doc_ids), host.doc_ids)
    np.testing.assert_array_equal(np.asarray(batch.context_ids), host.batch.context_ids)
    np.testing.assert_array_equal(np.asarray(batch.context_mask), host.batch.context_mask)
    np.testing.assert_allclose(np.asarray(batch.doc_vectors), host.batch.doc_vectors, atol=1e-6)
    assert np.asarray(batch.doc_mask).all()
    for name in ("question_ids", "question_mask", "decoder_input_ids", "targets", "target_mask"):
        np.testing.assert_array_equal(getattr(questions, name), getattr(host.batch, name))
    assert int(np.sum(n_cut)) == host.n_truncated["context"]
    assert n_truncated == {k: host.n_truncated[k] for k in ("question", "target")}
    if context_length == 14:
        assert host.n_truncated["context"] == 4 * len(examples)


def test_device_retrieval_trains_as_host_retrieval(toy, tmp_path):
    """Same losses step by step (1e-5) on the same mesh, and the loss falls."""
    common = {"train_steps": 10, "log_every": 1, "rag.n_docs": 4, **ON_MESH}
    train(tiny_config(toy, **common), str(tmp_path / "host"))
    train(tiny_config(toy, **common, **{"data.retrieval": "device"}), str(tmp_path / "device"))
    host, device = read_metrics(tmp_path / "host"), read_metrics(tmp_path / "device")
    for name in ("loss", "loss_per_token", "doc_entropy", "grad_norm"):
        np.testing.assert_allclose(
            [m[name] for m in device], [m[name] for m in host], rtol=1e-5, atol=1e-5, err_msg=name
        )
    for name in ("distinct_docs_in_window", "truncated_context", "truncated_question"):
        assert [m[name] for m in device] == [m[name] for m in host], name
    losses = [m["loss"] for m in device]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])  # it learns


def test_device_retrieval_refuses_a_scann_index(toy, tmp_path):
    build_index(
        toy / "corpus.jsonl",
        lambda: load_text_encoder(toy / "encoder", max_length=32),
        tmp_path / "scann",
        backend="scann",
        progress=False,
    )
    config = tiny_config(toy, **{"data.index": str(tmp_path / "scann"), "data.retrieval": "device"})
    with pytest.raises(ValueError, match=r"data\.retrieval.*ScaNN"):
        train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the workdir is touched
    with pytest.raises(ValueError, match=r"data\.retrieval must be"):
        train(tiny_config(toy, **{"data.retrieval": "gpu"}), str(tmp_path / "run"))
