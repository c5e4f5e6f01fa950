"""An in-program index refresh vs ``index build``: the same corpus, the same BERT_d weights.

The refresh (``rag_jax.doc_encoder.encode_corpus``, what a run with ``data.refresh_every``
does between two steps) re-encodes every passage from tokens already on the device, in one
jitted program, rows sharded as the index's; ``index build`` (``rag_jax.index.build_index``,
what ``python -m rag_jax.index build`` runs) reads the corpus, tokenizes, encodes in batches
and writes the vectors and passages. Both on N passages of the wiki demo's corpus (Wikipedia
lead sections: the title and the first 60 words), all-MiniLM-L6-v2, Ld = 64 tokens as the
demo's index. The refresh's vectors are checked against the index's (same weights: equal to
float32 rounding). Medians over interleaved repeats (``benchmarks/timing.py``).

    python benchmarks/bench_refresh.py                  # 2,000 passages
    python benchmarks/bench_refresh.py --passages 200   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/, examples/ and benchmarks/ from the repository
from benchmarks.timing import interleaved_medians  # noqa: E402

MAX_LENGTH = 64  # the demo index's BERT_d tokens per passage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import jax
    from flax import nnx

    from configs import tiny
    from examples.wiki import prepare
    from examples.wiki.run import minilm_dir
    from rag_jax import builders, doc_encoder, sharding, training
    from rag_jax.data import read_qa
    from rag_jax.index import build_index, load_text_encoder

    work = Path(tempfile.mkdtemp(prefix="bench_refresh_"))
    prepare.prepare(work / "data", args.passages)
    encoder_dir = minilm_dir(work)
    corpus = work / "data" / "corpus.jsonl"
    n_passages = sum(1 for _ in corpus.open())
    encoder = load_text_encoder(encoder_dir, max_length=MAX_LENGTH)
    builds = itertools.count()

    def index_build() -> None:
        out = work / f"index_{next(builds)}"
        build_index(corpus, encoder, out, backend="exact", encoder_path=str(encoder_dir))

    index_build()  # the index the refresh's run opens (and the build's compile)

    config = tiny.get_config()
    config.model.question_encoder = str(encoder_dir)
    config.data.index = str(work / "index_0")
    config.data.train = str(work / "data" / "train.jsonl")
    config.data.retrieval = "device"
    config.model.train_doc_encoder = True
    config.mesh.fsdp = 1  # one device, as the build
    mesh = sharding.make_mesh(config)
    model, *tokenizers = builders.build_model(config, mesh)
    examples, _ = read_qa(config.data.train)
    retriever = training.make_retriever(config, model, tokenizers, examples, mesh)

    def refresh() -> jax.Array:
        return jax.block_until_ready(doc_encoder.encode_corpus(model.doc_encoder, retriever.corpus))

    with retriever, jax.set_mesh(mesh):
        start = time.perf_counter()
        vectors = np.asarray(refresh())[:n_passages]  # the first call compiles
        first_refresh = time.perf_counter() - start
        built = np.load(work / "index_0" / "embeddings.npy")
        max_diff = float(np.max(np.abs(vectors - built)))
        assert max_diff < 1e-4, max_diff  # the same weights: the same vectors
        runs = {"refresh": refresh, "index build": index_build}
        medians = interleaved_medians(runs, args.repeats, warmup=0, desc="rounds")
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model.doc_encoder, nnx.Param)))
    results = {
        "passages": n_passages,
        "max_length": MAX_LENGTH,
        "doc_encoder_params": int(params),
        "refresh_seconds": medians["refresh"],
        "refresh_first_call_seconds": first_refresh,
        "index_build_seconds": medians["index build"],
        "ratio_refresh_to_build": medians["refresh"] / medians["index build"],
        "max_abs_diff_vectors": max_diff,
        "jax": jax.__version__,
        "machine": f"{jax.devices()[0].device_kind}, {len(jax.devices())} device(s)",
    }
    ms = 1000 / n_passages
    print(f"\n{n_passages} passages, Ld {MAX_LENGTH}, all-MiniLM-L6-v2 ({params:,} parameters)")
    print("| | seconds (median) | ms per passage |\n|---|---:|---:|")
    print(f"| refresh (encode_corpus) | {medians['refresh']:.1f} | {medians['refresh'] * ms:.1f} |")
    print(f"| refresh, first call (compiling) | {first_refresh:.1f} | {first_refresh * ms:.1f} |")
    print(f"| index build | {medians['index build']:.1f} | {medians['index build'] * ms:.1f} |")
    print(f"refresh / index build: {results['ratio_refresh_to_build']:.2f}")
    print(f"largest |refresh - index build| over the vectors: {max_diff:.1e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work)  # the data and the indexes built


if __name__ == "__main__":
    main()
