"""The references our tests and benchmarks compare against: transformers' PyTorch models on
random weights, and transformers' RAG losses.

Tests import ``from tests.oracles import ...``; benchmark scripts put the repository root on
``sys.path`` first. Everything here runs PyTorch, which only tests and benchmarks use:
``import rag_jax`` never imports torch.

Model sizes: ``TINY_*`` (odd widths such as 37 and 99, so a transposed or swapped dimension
fails loudly; a test compiles in seconds) and ``*_BASE`` (bert-base, bart-base) for timing.
"""

import types
from typing import Any

import numpy as np
import torch
import transformers
from transformers import RagTokenForGeneration

TINY_BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
BERT_BASE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
)
TINY_BART = dict(
    vocab_size=96,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=48,
    max_position_embeddings=40,
    pad_token_id=1,
    forced_eos_token_id=None,
)
BART_BASE = dict(  # transformers' BartConfig defaults are bart-large's
    vocab_size=50265,
    d_model=768,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=12,
    decoder_attention_heads=12,
    encoder_ffn_dim=3072,
    decoder_ffn_dim=3072,
    max_position_embeddings=1024,
    pad_token_id=1,
    forced_eos_token_id=2,
)
PAD = 1  # BART's pad id, which transformers' RAG losses mask out

# The class built for a config when none is named (DPR configs need one: question or context).
_MODEL_CLASSES = {
    "bert": transformers.BertModel,
    "bart": transformers.BartForConditionalGeneration,
    "mbart": transformers.MBartForConditionalGeneration,
}


# --- models on random weights --------------------------------------------------------------------


def bert_config(kind: str = "bert", **overrides: Any) -> transformers.PretrainedConfig:
    """A ``BertConfig`` (kind "bert") or ``DPRConfig`` ("dpr"), ``TINY_BERT`` unless overridden."""
    config_class = transformers.DPRConfig if kind == "dpr" else transformers.BertConfig
    return config_class(**{**TINY_BERT, **overrides})


def bart_config(kind: str = "bart", **overrides: Any) -> transformers.PretrainedConfig:
    """A ``BartConfig`` (kind "bart") or ``MBartConfig`` ("mbart"), ``TINY_BART`` unless
    overridden."""
    config_class = transformers.MBartConfig if kind == "mbart" else transformers.BartConfig
    return config_class(**{**TINY_BART, **overrides})


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds N(0, 0.1²) noise to every parameter (and draws BART's ``final_logits_bias``), so
    that zero biases, unit LayerNorm gains or a zero logits bias hide no bug. Eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # a tied parameter is listed, and perturbed, once
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
        bias = getattr(model, "final_logits_bias", None)  # a buffer, not a parameter
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=generator))
    return model.eval()


def random_model(
    config: transformers.PretrainedConfig, model_class: type | None = None, seed: int = 0
) -> torch.nn.Module:
    """``model_class(config)`` with random weights that depend only on ``seed``, eval mode.

    ``model_class`` defaults to ``BertModel`` / ``(M)BartForConditionalGeneration`` by the
    config's model_type; pass e.g. ``transformers.DPRQuestionEncoder`` or ``BertForMaskedLM``.
    """
    model_class = model_class or _MODEL_CLASSES[config.model_type]
    with torch.random.fork_rng():  # the init draws from torch's global generator
        torch.manual_seed(seed)
        model = model_class(config)
    return randomise(model, seed)


def torch_forward(model: torch.nn.Module, **inputs: Any) -> Any:
    """``model(**inputs)`` without gradients; numpy or JAX arrays become tensors, None stays."""
    tensors = {k: None if v is None else torch.from_numpy(np.array(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**tensors)


# --- RAG losses ----------------------------------------------------------------------------------


def transformers_get_nll(
    model_cls: type,
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    decoder_inputs: torch.Tensor,
    *,
    epsilon: float = 0.0,
    pad_token_id: int = PAD,
) -> torch.Tensor:
    """transformers' ``RagSequenceForGeneration.get_nll`` / ``RagTokenForGeneration.get_nll``
    (``model_cls``), called without building a RAG model.

    Args:
      seq_logits: ``[batch * n_docs, tgt_len, vocab]``, rows ``b * n_docs + k``.
      doc_scores: ``[batch, n_docs]`` raw retriever scores.
      decoder_inputs: ``[batch, tgt_len]``; the reference shifts them left by one to get the
        targets and ignores positions holding ``pad_token_id``.
      epsilon: label smoothing.

    Returns:
      The loss per example, ``[batch]`` (``reduce_loss=False``).
    """
    generator = types.SimpleNamespace(pad_token_id=pad_token_id, bos_token_id=None)
    n_docs = doc_scores.shape[1]
    config = types.SimpleNamespace(n_docs=n_docs, bos_token_id=None, generator=generator)
    fake_self = types.SimpleNamespace(config=config)
    # Both get_nll call RAG-Token's marginalize, which reads only config.n_docs.
    fake_self.marginalize = lambda *a, **k: RagTokenForGeneration.marginalize(fake_self, *a, **k)
    return model_cls.get_nll(fake_self, seq_logits, doc_scores, decoder_inputs, epsilon=epsilon)


def reference_nll(
    model_cls: type,
    logits: np.ndarray,
    doc_scores: np.ndarray,
    targets: np.ndarray,
    target_mask: np.ndarray,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transformers' get_nll on rag_jax's aligned inputs, in float64, with its gradients.

    Args:
      model_cls: transformers' ``RagSequenceForGeneration`` or ``RagTokenForGeneration``.
      logits: ``[batch, n_docs, tgt_len, vocab]``, ``logits[b, k, t]`` predicting
        ``targets[b, t]``.
      doc_scores: ``[batch, n_docs]``; targets, target_mask: ``[batch, tgt_len]``.
      epsilon: label smoothing.

    Returns:
      ``loss [batch]``, ``dloss/dlogits [batch, n_docs, tgt_len, vocab]`` and
      ``dloss/ddoc_scores [batch, n_docs]`` of the summed loss.

    The reference takes decoder inputs ``[batch, tgt_len + 1]`` and shifts them left, and finds
    padding by the pad id. So we prepend a start column, write PAD where the mask is off, and
    append one extra logit position, which the shift pairs with a pad and therefore ignores.
    """
    B, K, T, V = logits.shape
    decoder_inputs = np.where(target_mask, targets, PAD)
    decoder_inputs = np.concatenate([np.full((B, 1), 2), decoder_inputs], axis=1)  # (B, T + 1)
    extra = np.random.default_rng(0).normal(size=(B, K, 1, V))
    seq_logits = torch.tensor(
        np.concatenate([logits, extra], axis=2).reshape(B * K, T + 1, V),
        dtype=torch.float64,
        requires_grad=True,
    )
    scores = torch.tensor(doc_scores, dtype=torch.float64, requires_grad=True)
    loss = transformers_get_nll(
        model_cls, seq_logits, scores, torch.tensor(decoder_inputs), epsilon=epsilon
    )
    loss.sum().backward()
    dlogits = seq_logits.grad.numpy().reshape(B, K, T + 1, V)[:, :, :T]
    return loss.detach().numpy(), dlogits, scores.grad.numpy()


# --- RAG generation ------------------------------------------------------------------------------


def rag_for_generation(cls: type, generator: torch.nn.Module, n_docs: int) -> torch.nn.Module:
    """transformers' ``RagTokenForGeneration`` / ``RagSequenceForGeneration`` around
    ``generator``, with a tiny random DPR question encoder that decoding from given context
    inputs and doc scores never runs."""
    question_encoder = random_model(
        transformers.DPRConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32),
        transformers.DPRQuestionEncoder,
    )  # fmt: skip
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=n_docs
    )
    return cls(config, question_encoder=question_encoder, generator=generator).eval()


def rag_generate(model: torch.nn.Module, context_ids, context_mask, doc_scores, **settings):
    """``model.generate`` on ``(B, K, S)`` context inputs and ``(B, K)`` doc scores -> numpy."""
    B, K, S = np.shape(context_ids)
    ids = torch.tensor(np.reshape(context_ids, (B * K, S)))
    mask = torch.tensor(np.reshape(context_mask, (B * K, S)).astype(np.int64))
    with torch.no_grad():
        return model.generate(
            context_input_ids=ids, context_attention_mask=mask,
            doc_scores=torch.tensor(doc_scores), n_docs=K, **settings,
        ).numpy()  # fmt: skip
