"""RAG-Token on Natural Questions, the paper's setup: configs/rag_sequence_nq.py with
RAG-Token's marginalization (eq. 2). Its docstring lists the files, how to build the index
(``python -m rag_jax.index build --corpus data/wikipedia/psgs_w100.tsv ...``) and the
hyper-parameters' sources.

One GPU:

    python train.py --config configs/rag_token_nq.py --workdir runs/rag_token_nq

A TPU pod slice (the same command on every host, each reading its share of every batch):

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \\
        "cd rag_jax && python train.py --config configs/rag_token_nq.py \\
         --workdir gs://BUCKET/runs/rag_token_nq --distributed"
"""

import ml_collections

from configs import rag_sequence_nq


def get_config() -> ml_collections.ConfigDict:
    config = rag_sequence_nq.get_config()
    config.rag.marginalization = "token"  # RAG-Token (eq. 2)
    return config
