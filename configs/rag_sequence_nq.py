"""RAG-Sequence on Natural Questions, the paper's setup (Lewis et al. 2020, section 3 and
appendix B): a DPR question encoder and BART-large trained jointly, K=5 passages per question,
Adam at 3e-5, bf16 compute. These are configs/default.py's values (the schema holds the
paper's), each commented there with its source; configs/rag_token_nq.py is the same with
RAG-Token's marginalization.

Files, relative to the directory you launch from (override any path with --config.X=...):

    checkpoints/dpr-question_encoder-single-nq-base/   facebook/dpr-question_encoder-single-nq-base
                                                       (config.json, model.safetensors or
                                                       pytorch_model.bin, vocab.txt,
                                                       tokenizer.json, tokenizer_config.json)
    checkpoints/dpr-ctx_encoder-single-nq-base/        facebook/dpr-ctx_encoder-single-nq-base,
                                                       for the index only; give it the question
                                                       encoder's tokenizer files (both are
                                                       bert-base-uncased's): training compares
                                                       the index's tokenizer hash with BERT_q's
    checkpoints/bart-large/                            facebook/bart-large (config.json, weights,
                                                       vocab.json, merges.txt, tokenizer.json)
    data/wikipedia/psgs_w100.tsv                       DPR's 21M-passage Wikipedia (Dec. 2018)
    data/nq/nq-train.qa.csv                            DPR's NQ training questions:
                                                       question<TAB>["answer", ...] a line
    indexes/psgs_w100/                                 built once from the two above:

    python -m rag_jax.index build --corpus data/wikipedia/psgs_w100.tsv \\
        --encoder checkpoints/dpr-ctx_encoder-single-nq-base --out indexes/psgs_w100 --backend scann

One GPU (parameters on the one device; add --config.model.remat=True if memory runs short):

    python train.py --config configs/rag_sequence_nq.py --workdir runs/rag_sequence_nq

A TPU pod slice: the same command on every host at once, with --distributed (each host reads
its own share of every batch; parameters FSDP-sharded over all chips; checkpoints and the index
on storage every host sees, e.g. a GCS bucket or a shared disk):

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \\
        "cd rag_jax && python train.py --config configs/rag_sequence_nq.py \\
         --workdir gs://BUCKET/runs/rag_sequence_nq --distributed"
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config()  # the schema's values are this run's
