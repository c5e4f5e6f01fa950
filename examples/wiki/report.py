"""The demo's report: a Markdown table (results.md), all results (results.json), a plot
(demo.png) of the training curves and of retrieval recall@k."""

from __future__ import annotations

import json
from pathlib import Path

BERT_D = "rag_sequence_bert_d"  # the run that trains the document encoder too
# (label, result, metric); rows whose result is missing are left out. Strict scores (SQuAD
# v1.1's EM, DPR's has_answer) first, the lenient ones the demo's thresholds were set with
# (em_lenient: unicode-aware, the tokenizer's rendering of the answer accepted; recall@k_lenient:
# titles searched too) beside them.
ROWS = [
    ("Retrieval recall@1 (test), zero-shot MiniLM", "zero_shot", "recall@1"),
    ("Retrieval recall@1 (test), fine-tuned BERT_q", "rag_sequence", "recall@1"),
    ("Retrieval recall@1 (test), fine-tuned BERT_q and BERT_d", BERT_D, "recall@1"),
    ("Retrieval recall@5 (test), zero-shot MiniLM", "zero_shot", "recall@5"),
    ("Retrieval recall@5 (test), fine-tuned BERT_q", "rag_sequence", "recall@5"),
    ("Retrieval recall@5 (test), fine-tuned BERT_q and BERT_d", BERT_D, "recall@5"),
    ("Retrieval recall@1 lenient (test), zero-shot MiniLM", "zero_shot", "recall@1_lenient"),
    ("Retrieval recall@1 lenient (test), fine-tuned BERT_q", "rag_sequence", "recall@1_lenient"),
    ("Retrieval recall@1 lenient (test), fine-tuned BERT_q and BERT_d", BERT_D, "recall@1_lenient"),
    ("Exact match (test), RAG-Sequence (thorough)", "rag_sequence", "em"),
    ("Exact match (test), RAG-Sequence, BERT_d trained too", BERT_D, "em"),
    ("Exact match (test), RAG-Token", "rag_token", "em"),
    ("Exact match (test), closed-book BART", "closed_book", "em"),
    ("Exact match lenient (test), RAG-Sequence (thorough)", "rag_sequence", "em_lenient"),
    ("Exact match lenient (test), RAG-Sequence, BERT_d trained too", BERT_D, "em_lenient"),
    ("Exact match lenient (test), RAG-Token", "rag_token", "em_lenient"),
    ("Exact match lenient (test), closed-book BART", "closed_book", "em_lenient"),
    ("Hot swap: old name answered before the swap", "hot_swap", "answered_old_before"),
    ("Hot swap: new name answered after the swap", "hot_swap", "followed"),
]


def report(workdir: Path, results: dict) -> str:
    """The results table (Markdown), also written to results.md; all results to results.json."""
    lines = ["| measure | value |", "|---|---:|"] + [
        f"| {label} | {results[key][metric]:.3f} |" for label, key, metric in ROWS if key in results
    ]
    table = "\n".join(lines)
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return table


def differing_answers(run_dirs: dict, test: Path, n: int = 3) -> list[dict]:
    """Test questions that RAG-Sequence and RAG-Token answer differently (up to ``n``)."""
    predictions = {
        name: [
            json.loads(line)
            for line in (run_dirs[name] / "eval" / test.stem / "predictions.jsonl").open()
        ]
        for name in ("rag_sequence", "rag_token")
    }
    return [
        {
            "question": s["question"],
            "answers": s["answers"],
            "rag_sequence": s["prediction"],
            "rag_token": t["prediction"],
        }
        for s, t in zip(predictions["rag_sequence"], predictions["rag_token"], strict=True)
        if s["prediction"] != t["prediction"]
    ][:n]


def plot(workdir: Path, results: dict) -> Path:
    """demo.png: loss and p(z|x) entropy per step of each run, recall@k before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, run_dir) in enumerate(results["runs"].items()):
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(line) for line in lines]
        steps = [m["step"] for m in metrics]
        style = {"label": name, "color": f"C{i}"}  # a run's colour in both panels
        axes[0].plot(steps, [m["loss"] for m in metrics], **style)
        if name != "closed_book":
            axes[1].plot(steps, [m["doc_entropy"] for m in metrics], **style)
    axes[0].set(title="training loss (-log p(y|x) per question)", xlabel="step")
    axes[1].set(title="mean entropy of p(z|x) (nats)", xlabel="step")
    ks = [1, 5, 10, 20]
    curves = [
        ("zero-shot MiniLM", "zero_shot"),
        ("fine-tuned BERT_q", "rag_sequence"),
        ("fine-tuned BERT_q and BERT_d", BERT_D),
    ]
    for label, key in (curve for curve in curves if curve[1] in results):
        axes[2].plot(ks, [results[key][f"recall@{k}"] for k in ks], marker="o", label=label)
    axes[2].set(
        title="test retrieval recall@k", xlabel="k", xscale="log", xticks=ks, xticklabels=ks
    )
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    path = workdir / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
