"""RagModel against transformers' RagSequenceForGeneration / RagTokenForGeneration: the same
random DPR question encoder and BART, the same retrieved passages and document vectors."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rag_jax.rag import RagBatch, RagConfig, RagModel, load_rag, save_rag
from tests.oracles import PAD, bart_config, bert_config, random_model

B, K, S, T, H = 3, 4, 12, 6, 16


@pytest.fixture(scope="module")
def torch_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    question_encoder = random_model(
        bert_config("dpr", projection_dim=H), transformers.DPRQuestionEncoder, seed=1
    )
    generator = random_model(bart_config(), seed=2)
    question_encoder.save_pretrained(root / "q")
    generator.save_pretrained(root / "g")
    return root, question_encoder, generator


def inputs(seed: int, vocab_size: int, target_lengths=(T, 3, 1)):
    rng = np.random.default_rng(seed)
    question_ids = rng.integers(3, 90, size=(B, 7))
    question_mask = np.ones((B, 7), bool)
    question_mask[1, 5:] = False
    doc_vectors = rng.normal(size=(B, K, H)).astype(np.float32)
    context_ids = rng.integers(3, vocab_size, size=(B, K, S))
    context_mask = np.ones((B, K, S), bool)
    context_mask[0, 1, 8:] = False
    context_ids[~context_mask] = PAD
    targets = rng.integers(3, vocab_size, size=(B, T))
    target_mask = np.arange(T)[None] < np.array(target_lengths)[:, None]
    targets[~target_mask] = PAD
    decoder_input_ids = np.concatenate([np.full((B, 1), 2), targets[:, :-1]], axis=1)
    return RagBatch(
        question_ids=question_ids, question_mask=question_mask, doc_vectors=doc_vectors,
        doc_mask=np.ones((B, K), bool), context_ids=context_ids, context_mask=context_mask,
        decoder_input_ids=decoder_input_ids, targets=targets, target_mask=target_mask,
    )  # fmt: skip


def reference_loss(torch_parts, batch: RagBatch, marginalization: str):
    """transformers' loss and its gradient w.r.t. the question encoder's parameters."""
    _, question_encoder, generator = torch_parts
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=K
    )
    cls = {"sequence": transformers.RagSequenceForGeneration,
           "token": transformers.RagTokenForGeneration}[marginalization]  # fmt: skip
    model = cls(config, question_encoder=question_encoder, generator=generator).eval()
    # transformers shifts its labels left by one inside get_nll: pass the decoder inputs
    # (start token + targets) as labels, with the pad id where our mask is off.
    targets = np.where(batch.target_mask, batch.targets, PAD)
    labels = np.concatenate([batch.decoder_input_ids[:, :1], targets], axis=1)  # (B, T + 1)
    model.zero_grad()
    # Without a retriever transformers takes doc_scores as given: compute them from the
    # question encoder as its retriever path does (bmm of q(x) with the doc embeddings).
    query = model.question_encoder(
        torch.tensor(batch.question_ids),
        attention_mask=torch.tensor(batch.question_mask.astype(np.int64)),
    )[0]  # (B, H)
    doc_scores = torch.bmm(query.unsqueeze(1), torch.tensor(batch.doc_vectors).transpose(1, 2))
    out = model(
        doc_scores=doc_scores.squeeze(1),
        context_input_ids=torch.tensor(batch.context_ids.reshape(B * K, S)),
        context_attention_mask=torch.tensor(batch.context_mask.reshape(B * K, S).astype(np.int64)),
        labels=torch.tensor(labels),
        reduce_loss=False,
        n_docs=K,
    )  # fmt: skip
    out.loss.sum().backward()
    word_embedding_grad = (
        model.question_encoder.question_encoder.bert_model.embeddings.word_embeddings.weight.grad
    )
    return out.loss.detach().numpy(), word_embedding_grad.numpy()


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_losses_and_query_encoder_gradient_match_transformers(torch_parts, marginalization):
    root, _, generator = torch_parts
    model = load_rag(
        question_encoder_dir=root / "q", generator_dir=root / "g",
        config=RagConfig(n_docs=K, marginalization=marginalization),
    )  # fmt: skip
    # target lengths >= 2: transformers' RAG-Sequence adds the prior at target position 1
    batch = inputs(0, generator.config.vocab_size, target_lengths=(T, 3, 2))
    ref_loss, ref_grad = reference_loss(torch_parts, batch, marginalization)

    def loss(model):
        return model(batch)[0].sum()

    # jitted: one compile instead of the forward and backward dispatched op by op
    ours = nnx.jit(lambda model: model(batch)[0])(model)
    grads = nnx.jit(nnx.grad(loss))(model)
    np.testing.assert_allclose(ours, ref_loss, rtol=1e-4, atol=1e-4)
    ours_grad = np.asarray(grads.query_encoder.bert.embeddings.word.embedding[...])
    np.testing.assert_allclose(ours_grad, ref_grad, atol=1e-4)
    assert np.abs(ref_grad).max() > 1e-3  # the gradient does reach the query encoder


def test_single_token_targets_train_the_query_encoder(torch_parts):
    """Where transformers' RAG-Sequence drops the prior (one-token targets), ours keeps it
    (paper eq. 1): the loss is positive and BERT_q gets a gradient."""
    root, _, generator = torch_parts
    model = load_rag(question_encoder_dir=root / "q", generator_dir=root / "g",
                     config=RagConfig(n_docs=K))  # fmt: skip
    batch = inputs(1, generator.config.vocab_size, target_lengths=(1, 1, 1))
    grads = nnx.jit(nnx.grad(lambda m: m(batch)[0].sum()))(model)
    assert np.all(np.asarray(nnx.jit(lambda m: m(batch)[0])(model)) > 0)
    assert np.abs(np.asarray(grads.query_encoder.bert.embeddings.word.embedding[...])).max() > 1e-4


def test_saved_rag_loads_in_transformers_and_back(torch_parts, tmp_path):
    root, _, generator = torch_parts
    model = load_rag(question_encoder_dir=root / "q", generator_dir=root / "g",
                     config=RagConfig(n_docs=K, marginalization="token"))  # fmt: skip
    save_rag(model, tmp_path / "rag")
    batch = inputs(2, generator.config.vocab_size, target_lengths=(T, 3, 2))
    reloaded = load_rag(tmp_path / "rag")
    assert reloaded.config == model.config
    np.testing.assert_allclose(reloaded(batch)[0], model(batch)[0], rtol=1e-6)
    theirs = transformers.RagTokenForGeneration.from_pretrained(tmp_path / "rag")
    assert theirs.config.n_docs == K
    ref_loss, _ = reference_loss((root, theirs.question_encoder, theirs.generator), batch, "token")
    np.testing.assert_allclose(model(batch)[0], ref_loss, rtol=1e-4, atol=1e-4)


def test_no_index_needed_and_bad_config():
    with pytest.raises(ValueError, match="marginalization"):
        RagConfig(marginalization="tokens")
    with pytest.raises(ValueError, match="n_docs"):
        RagConfig(n_docs=0)
    assert issubclass(RagModel, nnx.Module)


def test_doc_score_scale_sharpens_the_prior(torch_parts):
    """doc_scores = scale · d(z)·q(x): the loss with scale s equals the loss of scale 1 on
    document vectors multiplied by s."""
    import dataclasses

    root, _, generator = torch_parts
    model = load_rag(question_encoder_dir=root / "q", generator_dir=root / "g",
                     config=RagConfig(n_docs=K, doc_score_scale=20.0))  # fmt: skip
    batch = inputs(5, generator.config.vocab_size)
    scaled_vectors = dataclasses.replace(batch, doc_vectors=batch.doc_vectors * 20.0)
    plain = load_rag(question_encoder_dir=root / "q", generator_dir=root / "g",
                     config=RagConfig(n_docs=K))  # fmt: skip
    np.testing.assert_allclose(model.doc_scores(batch), 20.0 * plain.doc_scores(batch), rtol=1e-5)
    np.testing.assert_allclose(model(batch)[0], plain(scaled_vectors)[0], rtol=1e-5)


@pytest.mark.parametrize(
    "cls, marginalization",
    [
        (transformers.RagTokenForGeneration, "token"),
        (transformers.RagSequenceForGeneration, "sequence"),
    ],
)
def test_load_rag_reads_the_marginalization_from_architectures(
    torch_parts, tmp_path, cls, marginalization
):
    """A checkpoint as transformers' save_pretrained writes it (the facebook/rag-token-nq /
    rag-sequence-nq layout, no rag_jax_config.json): its architectures decide."""
    _, question_encoder, generator = torch_parts
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=K
    )
    cls(config, question_encoder=question_encoder, generator=generator).save_pretrained(
        tmp_path / "rag"
    )
    saved = json.loads((tmp_path / "rag" / "config.json").read_text())
    assert saved["architectures"] == [cls.__name__]
    assert not (tmp_path / "rag" / "rag_jax_config.json").exists()
    model = load_rag(tmp_path / "rag")
    assert model.config.marginalization == marginalization and model.config.n_docs == K
    saved["architectures"] = ["RagTokenForGeneration", "RagSequenceForGeneration"]
    (tmp_path / "rag" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"config\.json: architectures .* name both"):
        load_rag(tmp_path / "rag")
