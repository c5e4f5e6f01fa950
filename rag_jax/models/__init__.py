"""Flax NNX models (BERT encoder, BART generator) and their Hugging Face checkpoint I/O."""

from rag_jax.models import partitioning
from rag_jax.models.bert import (
    BertConfig,
    BertEncoder,
    BertModel,
    l2_normalize,
    load_bert_encoder,
    load_bert_tokenizer,
    mean_pool,
    save_bert_encoder,
)
from rag_jax.models.checkpoint import (
    CheckpointError,
    assign_params,
    module_params,
    read_hf_config,
    read_state_dict,
    save_hf_checkpoint,
)

__all__ = [
    "BertConfig",
    "BertEncoder",
    "BertModel",
    "CheckpointError",
    "assign_params",
    "l2_normalize",
    "load_bert_encoder",
    "load_bert_tokenizer",
    "mean_pool",
    "module_params",
    "partitioning",
    "read_hf_config",
    "read_state_dict",
    "save_bert_encoder",
    "save_hf_checkpoint",
]
