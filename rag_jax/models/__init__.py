"""Flax NNX models (BERT encoder, BART generator) and their Hugging Face checkpoint I/O."""

from rag_jax.models import partitioning
from rag_jax.models.bart import (
    Bart,
    BartConfig,
    DecodeCache,
    EncoderMemory,
    KeyValue,
    hf_state_dict,
    load_bart,
    save_bart,
)
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
    "Bart",
    "BartConfig",
    "BertConfig",
    "BertEncoder",
    "BertModel",
    "CheckpointError",
    "DecodeCache",
    "EncoderMemory",
    "KeyValue",
    "assign_params",
    "hf_state_dict",
    "l2_normalize",
    "load_bart",
    "load_bert_encoder",
    "load_bert_tokenizer",
    "mean_pool",
    "module_params",
    "partitioning",
    "read_hf_config",
    "read_state_dict",
    "save_bart",
    "save_bert_encoder",
    "save_hf_checkpoint",
]
