"""Model shapes without weights: the ``config.json`` of the checkpoints the configs name.

``python -m rag_jax.compile`` builds a model's shapes from its checkpoint directory's
``config.json`` when the directory exists, and otherwise from the preset named by the
directory's last path component (``checkpoints/bart-large`` -> ``"bart-large"``), so that
``configs/rag_sequence_nq.py`` compiles on a fresh clone. The fields are those of the Hugging
Face ``config.json`` files of the named checkpoints (only the ones that set shapes or
special ids), and ``tokenizer`` is what a generator built from ``model.generator_init`` reads
from its tokenizer: its length and special ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_BERT_BASE = dict(
    model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
    type_vocab_size=2, pad_token_id=0,
)  # fmt: skip
# bert-base-uncased's WordPiece vocabulary: [PAD] 0, [CLS] 101, [SEP] 102
_BERT_BASE_TOKENIZER = dict(size=30522, pad=0, bos=101, eos=102)
_BART = dict(
    model_type="bart", vocab_size=50265, max_position_embeddings=1024, pad_token_id=1,
    bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
    forced_eos_token_id=2,
)  # fmt: skip
_BART_TOKENIZER = dict(size=50265, pad=1, bos=0, eos=2)


def _bart_preset(d_model: int, layers: int, heads: int, ffn: int) -> dict:
    """A BART shape: encoder and decoder alike (as bart-base and bart-large are)."""
    shape = dict(
        d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
    )  # fmt: skip
    return dict(kind="bart", config={**_BART, **shape}, tokenizer=_BART_TOKENIZER)


PRESETS: dict[str, dict[str, Any]] = {
    # facebook/dpr-question_encoder-single-nq-base: BERT-base, CLS pooling, no projection
    "dpr-question_encoder-single-nq-base": dict(
        kind="bert", config={**_BERT_BASE, "model_type": "dpr", "projection_dim": 0},
        tokenizer=_BERT_BASE_TOKENIZER,
    ),
    "dpr-ctx_encoder-single-nq-base": dict(
        kind="bert", config={**_BERT_BASE, "model_type": "dpr", "projection_dim": 0},
        tokenizer=_BERT_BASE_TOKENIZER,
    ),
    "bert-base-uncased": dict(kind="bert", config=_BERT_BASE, tokenizer=_BERT_BASE_TOKENIZER),
    # facebook/bart-base and facebook/bart-large
    "bart-base": _bart_preset(d_model=768, layers=6, heads=12, ffn=3072),
    "bart-large": _bart_preset(d_model=1024, layers=12, heads=16, ffn=4096),
    # The tiny BERT of benchmarks/gpu_train.py --tiny, for tests and configs/tiny.py
    "bert-tiny": dict(
        kind="bert",
        config=dict(
            model_type="bert", vocab_size=99, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
            type_vocab_size=2, pad_token_id=0,
        ),
        tokenizer=dict(size=99, pad=0, bos=2, eos=3),
    ),
}  # fmt: skip


def preset_name(path: str) -> str:
    """The preset a checkpoint path names: its last path component."""
    return Path(str(path).rstrip("/")).name


def find_preset(path: str, kind: str, field: str) -> dict[str, Any]:
    """The preset of checkpoint ``path`` (a ``kind`` "bert" or "bart" model).

    Raises:
      ValueError: naming ``field`` (the config field holding ``path``), when the path names
        no preset of that kind.
    """
    name = preset_name(path)
    preset = PRESETS.get(name)
    if preset is None or preset["kind"] != kind:
        known = sorted(k for k, v in PRESETS.items() if v["kind"] == kind)
        raise ValueError(
            f"config.{field}={str(path)!r} has no config.json and names no {kind.upper()} "
            f"preset; point it at a checkpoint directory or end it with one of {known}"
        )
    return preset
