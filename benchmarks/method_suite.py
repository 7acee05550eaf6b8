"""Method-evaluation suite (issue 9): the default clustering on planted families with ground truth.

For each planted family, kernel shape, group size and class balance, the default clustering of a run
(``dwk.clusterer.fit_kmeans_mode`` with the default ``ClusterConfig``) is fitted on the normalised
kernels, exactly as a run does, and compared with k-means given the true number of classes. One row:

- ``ARI``: adjusted Rand index against the planted labels on the structured part (noise excluded);
- ``km(k)``: the same for k-means told the true k (``dwk.controls.kmeans_true_k_ari``);
- ``found/true``: clusters the method found (minor ones included) / planted classes;
- ``noise@tau_null``: share of the pure-noise kernels classified at the run's tau_null, out of sample
  (cross-fitted, as a run classifies; ``--in-sample`` for the earlier, in-sample measure);
- ``stab``: seed stability, the minimum pairwise ARI of the three seeds' partitions;
- ``s``: seconds for the clustering (with cross-fitting);
- ``ok``: which of issue 9's criteria hold (A: ARI >= 0.9 x km, and >= 0.9 where km >= 0.95;
  N: noise <= alpha + 1 point; S: stability >= 0.9, asked of 7x7 and 5x5 only).

Families (``dwk.planted.planted_family``): ``dog-bank`` (the standard population, the bank's own 14
classes), ``finite-diff`` (forward/backward/centred differences of a Gaussian, a Gaussian and a DoG,
both signs: classes the bank names alike), ``random-fields`` (fixed smooth random fields, both signs:
classes the bank cannot name). ``--imbalanced`` puts half the classes at 1% of the structured kernels.

Run: ``.venv/bin/python benchmarks/method_suite.py`` (the default grid: three families x three shapes
at 2,000 and 20,000 kernels, balanced and imbalanced at 20,000: about 25 minutes on 2 cores);
``--sizes 200000`` for the large end.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def imbalanced_weights(n_classes: int, rare_share: float = 0.01) -> np.ndarray:
    """Half the classes (every other pair, so both signs of a pattern stay alike) at ``rare_share`` each."""
    rare = np.zeros(n_classes, bool)
    rare[[i for i in range(n_classes) if (i // 2) % 2 == 1]] = True
    w = np.where(rare, rare_share, 0.0)
    w[~rare] = (1.0 - w.sum()) / (~rare).sum()
    return w


def evaluate(family: str, shape: tuple[int, int], n: int, *, imbalanced: bool = False, seed: int = 1,
             noise_share: float = 0.2, cluster_overrides: dict | None = None) -> dict:
    """One row of the suite: the default clustering of one planted population against its labels."""
    from sklearn.metrics import adjusted_rand_score

    from dwk.clusterer import crossfit, fit_kmeans_mode
    from dwk.clusters import noise_kernels
    from dwk.config import ClusterConfig
    from dwk.controls import kmeans_true_k_ari
    from dwk.normalize import normalize_block
    from dwk.planted import family_classes, planted_family

    names = family_classes(family, shape)
    weights = imbalanced_weights(len(names)) if imbalanced else None
    k, lab = planted_family(family, n, shape, noise_share=noise_share, seed=seed, weights=weights)
    x = normalize_block(k.reshape(n, -1), "l2").astype(np.float64)
    cc = ClusterConfig(**(cluster_overrides or {}))
    noise = noise_kernels(cc.n_null, x.shape[1], "l2", seed=cc.seed + 1_000_003)
    t0 = time.perf_counter()
    f, selection = fit_kmeans_mode(x, noise, cc, shape)
    pred, cos = f.assign(x)
    tau_null = f.tau_null
    if cc.crossfit:  # classification out of sample, as a run does it (dwk.clusterer.crossfit)
        cf = crossfit(x, noise, cc, shape, selection["merge_cos"])
        cos, tau_null = cf.cosines(x, cf.fold), cf.tau_null
    seconds = time.perf_counter() - t0
    s = lab >= 0
    km = kmeans_true_k_ari(x[s], lab[s], seed=0, max_fit=cc.max_fit_kernels)
    ari = float(adjusted_rand_score(lab[s], pred[s]))
    noise_cls = float((cos[~s] >= tau_null).mean()) if (~s).any() else float("nan")
    stab = float(selection["seed_stability"]["ari_min"])
    crit_a = ari >= 0.9 * km and (km < 0.95 or ari >= 0.9)
    crit_n = noise_cls <= cc.alpha + 0.01
    crit_s = stab >= 0.9 or max(shape) < 5
    return dict(family=family, shape=f"{shape[0]}x{shape[1]}", n=n, imbalanced=imbalanced, ari=round(ari, 3),
                kmeans_ari_true_k=round(km, 3), n_found=int(f.clusterer.n_clusters_), n_true=len(names),
                noise_classified=round(noise_cls, 4), stability=round(stab, 3), seconds=round(seconds, 1),
                dissolved=len(selection.get("dissolved") or []),
                ok="".join(c if ok else "-" for c, ok in (("A", crit_a), ("N", crit_n), ("S", crit_s))))


HEAD = ("family", "shape", "n", "balance", "ARI", "km(k)", "found/true", "noise@tau_null", "stab", "dissolved", "s", "ok")


def format_row(r: dict) -> str:
    cells = (r["family"], r["shape"], f"{r['n']:,}", "1% classes" if r["imbalanced"] else "even", f"{r['ari']:.2f}",
             f"{r['kmeans_ari_true_k']:.2f}", f"{r['n_found']}/{r['n_true']}", f"{100 * r['noise_classified']:.1f}%",
             f"{r['stability']:.2f}", str(r["dissolved"]), f"{r['seconds']:.0f}", r["ok"])
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="dog-bank,finite-diff,random-fields")
    p.add_argument("--shapes", default="7x7,5x5,3x3")
    p.add_argument("--sizes", default="2000,20000", help="group sizes, comma-separated")
    p.add_argument("--imbalanced-size", type=int, default=20000,
                   help="also run imbalanced classes at this size (0: none)")
    p.add_argument("--seed", type=int, default=1, help="population seed")
    p.add_argument("--in-sample", action="store_true", help="cluster.crossfit: false (classify in sample)")
    args = p.parse_args(argv)
    overrides = {"crossfit": False} if args.in_sample else None

    print("| " + " | ".join(HEAD) + " |")
    print("|" + "---|" * len(HEAD))
    for family in args.families.split(","):
        for sh in args.shapes.split(","):
            shape = tuple(int(v) for v in sh.split("x"))
            runs = [(int(n), False) for n in args.sizes.split(",")]
            if args.imbalanced_size:
                runs.append((args.imbalanced_size, True))
            for n, imb in runs:
                print(format_row(evaluate(family, shape, n, imbalanced=imb, seed=args.seed,
                                          cluster_overrides=overrides)), flush=True)


if __name__ == "__main__":
    main()
