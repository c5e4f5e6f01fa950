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
    hnsw_file = cache / f"hnsw-ip-m{args.hnsw_m}.faiss"
    faiss.omp_set_num_threads(args.threads)
    if hnsw_file.exists():
        hnsw = faiss.read_index(str(hnsw_file))
    else:
        hnsw = faiss.IndexHNSWFlat(base.shape[1], args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        start = time.perf_counter()
        hnsw.add(base)
        print(f"HNSW built in {time.perf_counter() - start:.0f} s", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        faiss.write_index(hnsw, str(hnsw_file) + ".tmp")
        os.replace(str(hnsw_file) + ".tmp", hnsw_file)
    return scanns, hnsw


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
    parser.add_argument("--hnsw-ef", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    work = Path(args.work)
    base, queries, gt = (np.load(work / f) for f in ("base.npy", "queries.npy", "gt.npy"))
    scanns, hnsw = load_or_build(args, base)

    def scann_search(scann, leaves: int, reorder: int):
        return lambda q: scann.search(q, K, leaves_to_search=leaves, reorder_k=reorder).ids

    def hnsw_search(ef: int):
        def search(q):
            hnsw.hnsw.efSearch = ef
            return hnsw.search(q, K)[1]

        return search

    settings = {}
    for dtype, scann in scanns.items():
        for s in args.scann:
            leaves, reorder = map(int, s.split(","))
            settings[f"ScannIndex ({dtype}), leaves searched {leaves}, reorder {reorder}"] = (
                "scann",
                scann_search(scann, leaves, reorder),
            )
    for ef in args.hnsw_ef:
        settings[f"FAISS HNSW-IP M={args.hnsw_m}, efSearch {ef}"] = ("hnsw", hnsw_search(ef))

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
        median[name] = (np.median(b1), np.median(b256))
        print(
            f"| {name} | {recall[name]:.3f} | {np.median(b1):.0f} ({max(b1):.0f}) | "
            f"{np.median(b256):.0f} ({max(b256):.0f}) |"
        )
    print("\nScaNN / HNSW (medians), against each HNSW setting at most 0.002 above in recall:")
    for name, (kind, _) in settings.items():
        if kind != "scann":
            continue
        for other, (other_kind, _) in settings.items():
            if other_kind == "hnsw" and recall[other] <= recall[name] + 0.002:
                ratios = np.array(median[name]) / np.array(median[other])
                print(
                    f"  {name} ({recall[name]:.3f}) / efSearch {other.split()[-1]} "
                    f"({recall[other]:.3f}): batch 1 {ratios[0]:.2f}x, batch 256 {ratios[1]:.2f}x"
                )


if __name__ == "__main__":
    main()
