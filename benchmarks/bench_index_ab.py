"""ScaNN (our ScannIndex) against FAISS HNSW (inner product) in one process, timed interleaved.

``bench_index.py`` runs each backend in its own process so that peak memory is its own; on a
shared 2-core VM the speed of a process varies by +-30% from one minute to the next, which is
as large as the differences we want to see. Here both indexes live in one process and every
round times each setting once, in turn (batch 1 over ``--batch1-queries`` queries, then batch
256 over all), so slow spells hit all settings alike; we report the median and the best round.

Uses the data files ``bench_index.py`` writes (``base.npy``, ``queries.npy``, ``gt.npy``) and
caches the built indexes in ``--cache`` (ScaNN's own serialisation; ``faiss.write_index``),
since HNSW takes ~10 minutes to build at 1M x 768 on 2 cores.

    python benchmarks/bench_index.py --n 1000000 --dim 768 --backends ""   # data only
    python benchmarks/bench_index_ab.py \\
        --work /tmp/bench_index/n1000000-d768-c1000-s1.0-q1000-seed0 --rounds 7
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_index import K, recall_at_k


def load_or_build(args: argparse.Namespace, base: np.ndarray):
    import faiss

    from rag_jax.index.scann_index import ScannConfig, ScannIndex

    cache = Path(args.cache or Path(args.work) / "ab_cache")
    scanns = {}
    for dtype in args.scann_reorder_dtypes:  # the library's defaults but for this field
        scann_dir = cache / f"scann-{dtype}"
        if (scann_dir / "scann_index.json").exists():
            scann = ScannIndex.load(scann_dir, base)
        else:
            start = time.perf_counter()
            scann = ScannIndex.build(base, ScannConfig(reorder_dtype=dtype), threads=args.threads)
            print(f"ScaNN ({dtype}) built in {time.perf_counter() - start:.0f} s", flush=True)
            scann.save(scann_dir)
        scann.searcher.set_num_threads(args.threads)
        scanns[dtype] = scann
    faiss.omp_set_num_threads(args.threads)
    hnsws = {}
    for m in args.hnsw_m:
        hnsw_file = cache / f"hnsw-ip-m{m}.faiss"
        if hnsw_file.exists():
            hnsws[m] = faiss.read_index(str(hnsw_file))
            continue
        hnsw = faiss.IndexHNSWFlat(base.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        start = time.perf_counter()
        hnsw.add(base)
        print(f"HNSW M={m} built in {time.perf_counter() - start:.0f} s", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        faiss.write_index(hnsw, str(hnsw_file) + ".tmp")
        os.replace(str(hnsw_file) + ".tmp", hnsw_file)
        hnsws[m] = hnsw
    return scanns, hnsws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="a data directory of bench_index.py")
    parser.add_argument("--cache", help="where built indexes are kept (default WORK/ab_cache)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch1-queries", type=int, default=300)
    parser.add_argument(
        "--scann", nargs="+", default=["1,60", "1,100"], help="LEAVES,REORDER settings"
    )
    parser.add_argument(
        "--scann-reorder-dtypes",
        nargs="+",
        choices=("bfloat16", "float32"),
        default=["bfloat16"],
        help="one ScannIndex per re-scoring type, all timed in the same rounds",
    )
    parser.add_argument("--hnsw-ef", type=int, nargs="+", default=[24, 32, 48, 64, 96, 128])
    parser.add_argument(
        "--reference-ef",
        type=int,
        default=128,
        help="the reference's efSearch: ScaNN is also compared at each HNSW's recall there",
    )
    parser.add_argument(
        "--hnsw-vectors",
        action="store_true",
        help="also time HNSW followed by the gather of the k vectors that RAG needs",
    )
    parser.add_argument(
        "--bare", action="store_true", help="also time ScaNN's searcher without our wrapper"
    )
    parser.add_argument("--plot", help="write recall against q/s to this PNG (matplotlib)")
    parser.add_argument(
        "--tune",
        type=float,
        nargs="*",
        default=[],
        help="also time the settings ScannIndex.tune picks for these recall targets",
    )
    parser.add_argument("--tune-queries", type=int, default=200, help="tune's sample queries")
    parser.add_argument(
        "--hnsw-m", type=int, nargs="+", default=[16], help="one HNSW index per M (links a node)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    work = Path(args.work)
    base, queries, gt = (np.load(work / f) for f in ("base.npy", "queries.npy", "gt.npy"))
    scanns, hnsws = load_or_build(args, base)

    def scann_search(scann, leaves: int, reorder: int):
        return lambda q: scann.search(q, K, leaves_to_search=leaves, reorder_k=reorder).ids

    def scann_bare(scann, leaves: int, reorder: int):
        # ScaNN's own searcher, as our search calls it, without the vector gather and re-scoring.
        def search(q):
            if len(q) == 1:
                return scann.searcher.search(q[0], K, reorder, leaves)[0][None]
            per_thread = min(256, -(-len(q) // args.threads))  # as ScannIndex.search
            return scann.searcher.search_batched_parallel(
                q, K, reorder, leaves, batch_size=per_thread
            )[0]

        return search

    def hnsw_search(hnsw, ef: int, vectors: bool):
        def search(q):
            hnsw.hnsw.efSearch = ef
            ids = hnsw.search(q, K)[1]
            if vectors:  # what RAG needs besides the ids, as ScannIndex.search returns
                np.take(base, np.maximum(ids, 0), axis=0)
            return ids

        return search

    scann_settings = list(args.scann)
    for target in args.tune:  # ScannIndex.tune on a sample, recall checked on the rest
        for dtype, scann in scanns.items():
            start = time.perf_counter()
            config = scann.tune(queries[: args.tune_queries], K, target)
            seconds = time.perf_counter() - start
            found = scann.search(queries[args.tune_queries :], K).ids
            held_out = recall_at_k(found, gt[args.tune_queries :])
            print(
                f"ScannIndex ({dtype}).tune(first {args.tune_queries} queries, k={K}, "
                f"target_recall={target}): {config.leaves_to_search} leaves searched, "
                f"reorder {config.reorder_k}, in {seconds:.1f} s; recall@{K} on the other "
                f"{len(queries) - args.tune_queries} queries {held_out:.3f}"
            )
            scann_settings.append(f"{config.leaves_to_search},{config.reorder_k}")
    settings = {}
    for dtype, scann in scanns.items():
        for s in dict.fromkeys(scann_settings):
            leaves, reorder = map(int, s.split(","))
            name = f"ScannIndex ({dtype}), leaves searched {leaves}, reorder {reorder}"
            kind = "ScannIndex.search, ids + vectors" + (f" ({dtype})" if len(scanns) > 1 else "")
            settings[name] = (kind, scann_search(scann, leaves, reorder))
            if args.bare:
                kind = "ScaNN searcher alone, ids only" + (f" ({dtype})" if len(scanns) > 1 else "")
                settings[f"{name}, bare searcher"] = (kind, scann_bare(scann, leaves, reorder))
    for m, hnsw in hnsws.items():
        for ef in args.hnsw_ef:
            name = f"FAISS HNSW-IP M={m}, efSearch {ef}"
            settings[name] = (f"FAISS HNSW-IP M={m}, ids only", hnsw_search(hnsw, ef, False))
            if args.hnsw_vectors:
                kind = f"FAISS HNSW-IP M={m} + vector gather"
                settings[f"{name} + vectors"] = (kind, hnsw_search(hnsw, ef, vectors=True))

    recall = {}
    for name, (_, search) in settings.items():
        ids = np.concatenate([search(queries[i : i + 256]) for i in range(0, len(queries), 256)])
        recall[name] = recall_at_k(ids, gt)
    timings = {name: ([], []) for name in settings}
    batch1 = queries[: args.batch1_queries]
    for round_ in range(args.rounds):
        for name, (_, search) in settings.items():
            start = time.perf_counter()
            for i in range(len(batch1)):
                search(batch1[i : i + 1])
            timings[name][0].append(len(batch1) / (time.perf_counter() - start))
            start = time.perf_counter()
            for i in range(0, len(queries), 256):
                search(queries[i : i + 256])
            timings[name][1].append(len(queries) / (time.perf_counter() - start))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    n, dim = base.shape
    print(f"\n{n:,} x {dim}, {len(queries)} queries, k={K}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds; q/s median (best)\n")  # fmt: skip
    print("| index, setting | recall@10 | q/s batch 1 | q/s batch 256 |")
    print("|---|---:|---:|---:|")
    median = {}
    for name in settings:
        b1, b256 = timings[name]
        median[name] = np.array([np.median(b1), np.median(b256)])
        print(
            f"| {name} | {recall[name]:.3f} | {np.median(b1):.0f} ({max(b1):.0f}) | "
            f"{np.median(b256):.0f} ({max(b256):.0f}) |"
        )
    curves = {
        kind: sorted(
            ((recall[name], median[name]) for name, (k, _) in settings.items() if k == kind),
            key=lambda point: point[0],
        )
        for kind in dict.fromkeys(k for k, _ in settings.values() if k.startswith("FAISS"))
    }
    print("\nAt equal recall: each ScaNN setting's median q/s over HNSW's, interpolated linearly")
    print("in recall between the two efSearch settings around it (medians):\n")
    print("| ScaNN setting | recall@10 | against | batch 1 | batch 256 |")
    print("|---|---:|---|---:|---:|")
    for name, (kind, _) in settings.items():
        if kind.startswith("FAISS"):
            continue
        at_recall = {other: qps_at_recall(curves[other], recall[name]) for other in curves}
        at_recall = {other: qps for other, qps in at_recall.items() if qps is not None}
        if len(at_recall) > 1:  # the fastest HNSW at this recall, batch size by batch size
            at_recall["fastest of these HNSW"] = np.max(list(at_recall.values()), axis=0)
        for other, qps in at_recall.items():
            ratio = median[name] / qps
            print(f"| {name} | {recall[name]:.3f} | {other} | {ratio[0]:.2f}x | {ratio[1]:.2f}x |")
    reference_ef_table(args.reference_ef, settings, recall, median)
    if args.plot:
        plot(args.plot, settings, recall, median, f"{n:,} x {dim}, k={K}")


def reference_ef_table(ef: int, settings: dict, recall: dict, median: dict) -> None:
    """The fastest ScaNN setting at least as accurate as each HNSW run with the reference's ef.

    The other table fixes ScaNN's settings and finds HNSW's q/s at that recall; this one fixes
    HNSW as the reference configures it (efSearch 128) and takes, batch size by batch size, the
    fastest ScaNN setting (median q/s) whose recall@10 is no lower than HNSW's there.
    """
    hnsw_names = [
        name for name, (kind, _) in settings.items()
        if kind.startswith("FAISS") and name.endswith(f"efSearch {ef}")
    ]  # fmt: skip
    scann_kinds = dict.fromkeys(k for k, _ in settings.values() if k.startswith("ScannIndex"))
    if not hnsw_names or not scann_kinds:
        return
    print(f"\nAgainst HNSW with the reference's efSearch {ef}: the fastest ScaNN setting with at")
    print("least HNSW's recall@10, median q/s over HNSW's:\n")
    print("| HNSW | its recall@10 | ScaNN | batch 1 | batch 256 |")
    print("|---|---:|---|---:|---:|")
    for kind in scann_kinds:
        for hnsw in hnsw_names:
            reaching = [
                name for name, (k, _) in settings.items()
                if k == kind and recall[name] >= recall[hnsw]
            ]  # fmt: skip
            if not reaching:
                print(f"| {hnsw} | {recall[hnsw]:.4f} | {kind} | not reached | not reached |")
                continue
            ratio = np.max([median[name] for name in reaching], axis=0) / median[hnsw]
            print(f"| {hnsw} | {recall[hnsw]:.4f} | {kind} | {ratio[0]:.2f}x | {ratio[1]:.2f}x |")


def qps_at_recall(curve: list[tuple[float, np.ndarray]], target: float) -> np.ndarray | None:
    """Linear interpolation in recall of (recall, q/s) points; None outside their range."""
    for (r_lo, q_lo), (r_hi, q_hi) in itertools.pairwise(curve):
        if r_lo <= target <= r_hi:
            weight = 0.0 if r_hi == r_lo else (target - r_lo) / (r_hi - r_lo)
            return q_lo + weight * (q_hi - q_lo)
    return None


def plot(path: str, settings: dict, recall: dict, median: dict, title: str) -> None:
    """Recall@10 against q/s, one panel per batch size, one line per kind of setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for column, batch in enumerate((1, 256)):
        axis = axes[column]
        for kind in dict.fromkeys(k for k, _ in settings.values()):
            points = sorted(
                (recall[name], median[name][column])
                for name, (k, _) in settings.items()
                if k == kind
            )
            r, q = zip(*points, strict=True)
            axis.plot(q, r, "o--" if "alone" in kind else "o-", label=kind)
        axis.set_xscale("log")
        axis.set_xlabel(f"queries/s, batch {batch} (median)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall@10")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    main()
