"""MIPS backends on one machine: our ScannIndex and ExactIndex against FAISS HNSW and IVF-PQ.

Data: clustered synthetic vectors (a Gaussian mixture with random norms; NOT real embeddings)
unless ``--real EMBEDDINGS.npy`` gives real ones (queries are then held-out rows). Ground truth is
exact top-10 inner product search in float64 (NumPy). Each backend runs in its own subprocess, so
its peak resident memory (``ru_maxrss``, which includes the base vectors it loads: N * dim * 4
bytes) is its own.

For each backend we report build time, peak memory, and for a sweep of its search knob (ScaNN
leaves searched, HNSW efSearch, IVF nprobe): queries/s at batch 1 and batch 256 and recall@10.
Then the fastest setting of each backend reaching the target recall, and ScaNN's ratios to HNSW.

HNSW is configured as the reference RAG retriever does (DPR's DenseHNSWFlatIndexer: MIPS turned
into L2 search by appending sqrt(max_norm^2 - |x|^2) to each vector, efConstruction 200,
efSearch 128), except for M: the reference's M=512 does not build in reasonable time on a
2-core machine (at 1M x 768, the first 50k points took 116 s, the next 50k over 260 s, and on
slowing; M=16, 32 and 64 take 581, 853 and 937 s), so ``--hnsw-m`` (default 16) is used and
stated in the output. ``bench_index_ab.py`` compares against several M at equal recall.

    python benchmarks/bench_index.py --n 1000000 --dim 768          # the full run
    python benchmarks/bench_index.py --n 20000 --dim 128 --queries 300   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGET_RECALL = 0.95
K = 10


# ----------------------------------------------------------------------------------------------
# Data


def make_data(args: argparse.Namespace, work: Path) -> None:
    """Writes base.npy (N, dim), queries.npy (Q, dim) and gt.npy (Q, 10) into ``work``."""
    if (work / "gt.npy").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    if args.real:
        vectors = np.load(args.real, mmap_mode="r")
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(vectors))
        np.save(work / "queries.npy", np.asarray(vectors[np.sort(order[: args.queries])]))
        np.save(work / "base.npy", np.asarray(vectors[np.sort(order[args.queries :])], np.float32))
    else:
        _clustered(args, work)
    base, queries = np.load(work / "base.npy", mmap_mode="r"), np.load(work / "queries.npy")
    print(f"ground truth for {len(queries)} queries over {base.shape} ...", flush=True)
    np.save(work / "gt.npy", _exact_top_k(base, queries, K))


def _clustered(args: argparse.Namespace, work: Path) -> None:
    """Gaussian mixture: ``n_clusters`` centres ~ N(0, I), points = centre + noise * N(0, I),
    each scaled by U(0.5, 1.5) so norms differ (a MIPS, not a cosine, problem)."""
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)

    def sample(m: int) -> np.ndarray:
        points = centres[rng.integers(0, args.clusters, m)]
        points += args.noise * rng.standard_normal((m, args.dim), dtype=np.float32)
        return points * rng.uniform(0.5, 1.5, (m, 1)).astype(np.float32)

    np.save(work / "queries.npy", sample(args.queries))
    base = np.lib.format.open_memmap(work / "base.npy", "w+", np.float32, (args.n, args.dim))
    for start in range(0, args.n, 65536):
        base[start : start + 65536] = sample(min(65536, args.n - start))
    base.flush()


def _exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute force in float64 over 65536-row blocks of the memory map (bounded memory)."""
    best_scores = np.full((len(queries), k), -np.inf)
    best_ids = np.zeros((len(queries), k), np.int64)
    q = queries.astype(np.float64)
    for start in range(0, len(base), 65536):
        scores = q @ np.asarray(base[start : start + 65536], np.float64).T  # (Q, C)
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, order, 1)
        best_ids = np.take_along_axis(ids, order, 1)
    return best_ids


# ----------------------------------------------------------------------------------------------
# Workers: one backend each, in its own process


def recall_at_k(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a[:K]) & set(b[:K])) / K for a, b in zip(ids, gt, strict=True)]))


def timed_search(
    search, queries: np.ndarray, batch: int, max_queries: int, repeats: int = 1
) -> tuple[float, np.ndarray]:
    """Queries/s of ``search(batch_of_queries) -> ids`` and the ids, over up to max_queries.

    The best of ``repeats`` passes: on a shared 2-core VM single passes vary by +-30%.
    """
    queries = queries[:max_queries]
    search(queries[:batch])  # warm-up (compilation, caches)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        ids = [search(queries[i : i + batch]) for i in range(0, len(queries), batch)]
        best = max(best, len(queries) / (time.perf_counter() - start))
    return best, np.concatenate(ids)


def sweep(name: str, knobs: list, make_search, queries, gt, args) -> list[dict]:
    rows = []
    for knob in knobs:
        search = make_search(knob)
        qps1, _ = timed_search(search, queries, 1, args.batch1_queries, args.repeats)
        qps256, ids = timed_search(search, queries, 256, len(queries), args.repeats)
        rows.append(
            {
                "setting": f"{name}={','.join(map(str, np.atleast_1d(knob)))}",
                "qps_b1": qps1,
                "qps_b256": qps256,
                "recall": recall_at_k(ids, gt),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def worker(backend: str, args: argparse.Namespace, work: Path) -> dict:
    base = np.load(work / "base.npy")  # in RAM, as every backend needs it
    queries, gt = np.load(work / "queries.npy"), np.load(work / "gt.npy")
    n, dim = base.shape
    start = time.perf_counter()
    if backend == "scann":
        from rag_jax.index.scann_index import ScannConfig, ScannIndex

        config = ScannConfig(
            dims_per_block=args.scann_dims_per_block,
            quantize_centroids=args.scann_quantize_centroids,
            training_sample_size=args.scann_training_sample,
            ah_training_sample_size=args.scann_ah_training_sample,
            reorder_dtype=args.scann_reorder_dtype,
        )
        index = ScannIndex.build(base, config, threads=args.threads)
        index.searcher.set_num_threads(args.threads)
        build_s, config = time.perf_counter() - start, index.config
        leaves = {max(1, round(config.num_leaves * f)) for f in args.scann_fractions}
        grid = [(n_leaves, r) for n_leaves in sorted(leaves) for r in args.scann_reorder]
        grid.append((config.leaves_to_search, config.reorder_k))  # the defaults

        def make_search(setting):
            n_leaves, reorder = setting
            return lambda q: index.search(q, K, leaves_to_search=n_leaves, reorder_k=reorder).ids

        rows = sweep("leaves,reorder", grid, make_search, queries, gt, args)
        label = (
            f"ScannIndex (ours): {config.num_leaves} leaves, "
            f"AH {config.dims_per_block} dims/block, "
            f"{'int8' if config.quantize_centroids else 'float32'} centroids, "
            f"{config.reorder_dtype} re-scoring, "
            f"spherical partitions; defaults leaves={config.leaves_to_search}, "
            f"reorder={config.reorder_k} (last row)"
        )
    elif backend == "exact":
        from rag_jax.index.exact import ExactIndex

        index = ExactIndex.from_array(base)  # default chunk_size
        index.embeddings.block_until_ready()
        build_s = time.perf_counter() - start

        def make_search(_):
            return lambda q: np.asarray(index.search(q, K).ids)

        args.batch1_queries = min(args.batch1_queries, 20)  # ~N * dim * 4 bytes read per query
        rows = sweep("chunk", [index.chunk_size], make_search, queries, gt, args)
        label = "ExactIndex (ours): JAX matmul + lax.top_k on CPU"
    elif backend in ("hnsw", "hnsw-ip"):
        import faiss

        faiss.omp_set_num_threads(args.threads)
        augment = backend == "hnsw"
        if augment:  # DPR's MIPS -> L2 reduction: vectors gain sqrt(phi - |x|^2), queries 0
            norms = (base.astype(np.float64) ** 2).sum(1)
            base = np.hstack([base, np.sqrt(norms.max() - norms).astype(np.float32)[:, None]])
            index = faiss.IndexHNSWFlat(dim + 1, args.hnsw_m)
        else:
            index = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
        index.add(base)
        build_s = time.perf_counter() - start

        def make_search(ef):
            def search(q):
                index.hnsw.efSearch = ef
                if augment:
                    q = np.hstack([q, np.zeros((len(q), 1), np.float32)])
                return index.search(q, K)[1]

            return search

        rows = sweep("efSearch", args.hnsw_ef, make_search, queries, gt, args)
        label = (
            f"FAISS IndexHNSWFlat(d+1, M={args.hnsw_m}, L2 on DPR-augmented vectors), "
            "efConstruction 200: the reference's setup except M (reference: M=512)"
            if augment
            else f"FAISS IndexHNSWFlat(d, M={args.hnsw_m}, METRIC_INNER_PRODUCT), "
            "efConstruction 200"
        )
    elif backend in ("ivfpq", "ivfpq-refine"):
        import faiss

        faiss.omp_set_num_threads(args.threads)
        nlist = args.ivf_nlist or int(np.sqrt(n))
        m = args.pq_m or dim // 8
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        train = base[np.random.default_rng(0).permutation(n)[: max(40 * nlist, 50_000)]]
        ivf.train(train)
        refine = args.ivf_refine if backend == "ivfpq-refine" else 0
        index = faiss.IndexRefineFlat(ivf) if refine else ivf
        if refine:  # IVF-PQ candidates re-scored exactly against stored float32 vectors
            index.k_factor = refine
        index.add(base)
        build_s = time.perf_counter() - start

        def make_search(nprobe):
            def search(q):
                ivf.nprobe = nprobe
                return index.search(q, K)[1]

            return search

        rows = sweep("nprobe", args.ivf_nprobe, make_search, queries, gt, args)
        rerank = f" + exact re-rank of top {refine * K} (IndexRefineFlat)" if refine else ""
        label = f"FAISS IVF{nlist},PQ{m}x8 (inner product){rerank}"
    else:
        raise ValueError(backend)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "backend": backend,
        "label": label,
        "build_s": build_s,
        "peak_gib": peak_gib,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# Driver


def best_at_target(result: dict, key: str) -> dict | None:
    ok = [r for r in result["rows"] if r["recall"] >= TARGET_RECALL]
    return max(ok, key=lambda r: r[key]) if ok else None


def report(results: list[dict], args: argparse.Namespace, base_gib: float) -> None:
    data = (
        f"real embeddings from {args.real}"
        if args.real
        else (
            f"clustered synthetic data ({args.clusters} Gaussian clusters, noise {args.noise}, "
            "norms x U(0.5, 1.5))"
        )
    )
    print(f"\n## {args.n:,} x {args.dim} float32, {data}; {args.queries} queries, k={K}")
    print(
        f"machine: {os.cpu_count()} cores; {args.threads} threads per backend; "
        f"peak memory includes the {base_gib:.2f} GiB base array\n"
    )
    for r in results:
        earlier = " (from an earlier invocation on the same data)" if r.get("earlier") else ""
        print(f"- {r['backend']}: {r['label']}{earlier}")
    print()
    print("| backend | setting | build s | peak GiB | q/s batch 1 | q/s batch 256 | recall@10 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        for row in r["rows"]:
            print(
                f"| {r['backend']} | {row['setting']} | {r['build_s']:.1f} | {r['peak_gib']:.2f} "
                f"| {row['qps_b1']:.1f} | {row['qps_b256']:.1f} | {row['recall']:.3f} |"
            )
    by_name = {r["backend"]: r for r in results}
    print(f"\nfastest setting with recall@10 >= {TARGET_RECALL}:")
    for key, name in [("qps_b1", "batch 1"), ("qps_b256", "batch 256")]:
        best = {b: best_at_target(r, key) for b, r in by_name.items()}
        line = ", ".join(
            f"{b} {row[key]:.1f} q/s ({row['setting']}, recall {row['recall']:.3f})"
            if row
            else f"{b} never reaches it"
            for b, row in best.items()
        )
        print(f"  {name}: {line}")
        for hnsw in ("hnsw", "hnsw-ip"):
            if best.get("scann") and best.get(hnsw):
                ratio = best["scann"][key] / best[hnsw][key]
                print(f"    ScaNN / {hnsw} queries/s at {name}: {ratio:.2f}x")
    for hnsw in ("hnsw", "hnsw-ip"):
        if "scann" in by_name and hnsw in by_name:
            ratio = by_name["scann"]["build_s"] / by_name[hnsw]["build_s"]
            print(f"  ScaNN build time / {hnsw} build time: {ratio:.3f}")


def main() -> None:
    from rag_jax.index.scann_index import ScannConfig

    defaults = ScannConfig()  # the sweep starts from the library's own settings
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", help="an (N, dim) .npy of real embeddings instead of synthetic")
    parser.add_argument(
        "--backends", default="scann,hnsw-ip,hnsw,exact,ivfpq,ivfpq-refine", help="comma-separated"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch1-queries", type=int, default=300, help="queries timed one by one")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes per setting; the best counts"
    )
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument(
        "--scann-fractions",
        type=float,
        nargs="+",
        default=[0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
        help="leaves searched, as fractions of the leaves",
    )
    parser.add_argument("--scann-reorder", type=int, nargs="+", default=[60, 100])
    parser.add_argument("--scann-dims-per-block", type=int, default=defaults.dims_per_block)
    parser.add_argument("--scann-quantize-centroids", action="store_true")
    parser.add_argument(
        "--scann-reorder-dtype", choices=("bfloat16", "float32"), default=defaults.reorder_dtype
    )
    parser.add_argument("--scann-training-sample", type=int, default=defaults.training_sample_size)
    parser.add_argument(
        "--scann-ah-training-sample", type=int, default=defaults.ah_training_sample_size
    )
    parser.add_argument("--ivf-nlist", type=int)
    parser.add_argument("--pq-m", type=int)
    parser.add_argument("--ivf-refine", type=int, default=10, help="ivfpq-refine: k_factor")
    parser.add_argument("--ivf-nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--work", default="/tmp/bench_index")
    parser.add_argument(
        "--merge", action="store_true", help="report with other backends' saved results"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = (
        f"real-{Path(args.real).stem}"
        if args.real
        else (
            f"n{args.n}-d{args.dim}-c{args.clusters}-s{args.noise}-q{args.queries}-seed{args.seed}"
        )
    )
    work = Path(args.work) / name
    if args.worker:
        print(json.dumps(worker(args.worker, args, work)))
        return
    make_data(args, work)
    base = np.load(work / "base.npy", mmap_mode="r")
    args.n, args.dim = base.shape
    backends = [b for b in args.backends.split(",") if b]  # "" with --merge: only report
    results = []
    if args.merge and (work / "results.json").exists():  # keep other backends' earlier numbers
        earlier = json.loads((work / "results.json").read_text())
        results = [{**r, "earlier": True} for r in earlier if r["backend"] not in backends]
    for backend in backends:
        print(f"running {backend} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--worker", backend],
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.returncode:  # one failing backend must not lose the others' numbers
            print(f"{backend} failed with exit code {proc.returncode}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        (work / "results.json").write_text(json.dumps(results, indent=1))
        report(results, args, base.nbytes / 2**30)  # after each backend: a long run shows progress
    if not backends:
        report(results, args, base.nbytes / 2**30)


if __name__ == "__main__":
    main()
