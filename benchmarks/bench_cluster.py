"""What the default clustering of one shape group costs, against one plain k-means fit.

``dwk.clusterer.fit_kmeans_mode`` (what a run calls for every shape group: three seeds of 48-cluster
k-means over-segmentation with ``N_INIT`` restarts each, six merge thresholds, naming, and the
refinement into nearest-prototype clusters) is timed on N normalised 7x7 kernels of the standard
planted population, with ``refine`` on (the default) and off. The baseline, measured in the same
run on the same kernels, is one ``sklearn.cluster.KMeans(48, n_init=1)`` fit: the unit of work a
researcher already has a feel for. ``--memory`` repeats each once under ``tracemalloc`` and reports
the peak of Python-tracked allocations (NumPy's included), again as a ratio to the baseline.

Run: ``.venv/bin/python benchmarks/bench_cluster.py`` (``--help`` for sizes; about 2 minutes on 2
cores for the default 20,000 and 100,000 kernels).
"""
from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np
from _load import OtherLoad  # benchmarks/ is the script's folder, so on sys.path


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` l2-normalised 7x7 kernels of the standard population (20% noise) and 20,000 null kernels."""
    from dwk.clusters import noise_kernels
    from dwk.normalize import normalize_block
    from dwk.planted import planted_population

    k, _ = planted_population(n, (7, 7), noise_share=0.2, snr=2.0, seed=seed)
    return normalize_block(k.reshape(n, -1), "l2").astype(np.float64), noise_kernels(20000, 49, "l2", seed=seed + 1)


def variants(x: np.ndarray, noise: np.ndarray):
    from sklearn.cluster import KMeans

    from dwk.clusterer import fit_kmeans_mode
    from dwk.config import ClusterConfig

    return {
        "one KMeans(48, n_init=1)": lambda: KMeans(48, n_init=1, random_state=0).fit(x),
        "fit_kmeans_mode, refine off": lambda: fit_kmeans_mode(x, noise, ClusterConfig(refine=False), (7, 7)),
        "fit_kmeans_mode (default)": lambda: fit_kmeans_mode(x, noise, ClusterConfig(), (7, 7)),
    }


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000,100000", help="kernel counts, comma-separated")
    p.add_argument("--memory", action="store_true", help="also measure peak traced memory (one more run of each)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    other = OtherLoad()
    print(f"7x7 standard planted population (14 classes, SNR 2, 20% noise); {os.cpu_count()} CPUs")
    hdr = f"{'kernels':>8s}  {'variant':30s} {'seconds':>8s} {'x base':>7s}" + (f" {'peak MB':>8s} {'x base':>7s}" if args.memory else "")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        x, noise = make_data(n, args.seed)
        base_t = base_m = None
        for name, fn in variants(x, noise).items():
            t = timed(fn)
            m = peak_mb(fn) if args.memory else None
            base_t, base_m = base_t or t, base_m or m
            line = f"{n:8,d}  {name:30s} {t:8.1f} {t / base_t:7.1f}"
            if args.memory:
                line += f" {m:8.0f} {m / base_m:7.1f}"
            rows.append(line)
            print("  " + line, flush=True)
    print()
    print(hdr)
    print("-" * len(hdr))
    print("\n".join(rows))
    print("  " + other.note())


if __name__ == "__main__":
    main()
