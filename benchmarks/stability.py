"""Seed stability of the default clustering on standard planted populations (a measurement of the
method, not of speed): the README's table "Seed stability of the 5x5 populations" comes from here.

For each population seed and each seed set (``cluster.seed`` s, so k-means seeds s, s+1, s+2),
``dwk.clusterer.fit_kmeans_mode`` runs as in a run and prints the chosen merge threshold, the seed
stability (min and mean pairwise ARI of the three seeds' classified partitions), the ARI of the
clusters against the planted labels on the structured part, and the clusters dissolved as borders.
Flags switch off the later steps of the method to reproduce the table's earlier columns.

Run: ``.venv/bin/python benchmarks/stability.py`` (populations 1-6 with seed set 0, then
populations 1 and 3 with seed sets 10 and 20: about 5 minutes on 2 cores).
"""
from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="5x5")
    p.add_argument("--runs", default="1:0,2:0,3:0,4:0,5:0,6:0,1:10,1:20,3:10,3:20",
                   help="population:seed-set pairs, comma-separated")
    p.add_argument("--n", type=int, default=20000, help="kernels per population")
    p.add_argument("--no-refine", action="store_true", help="cluster.refine: false (the 'before' column)")
    p.add_argument("--no-dissolve", action="store_true", help="cluster.dissolve_blends: false")
    p.add_argument("--n-init", type=int, default=None, help="k-means restarts per over-segmentation (dwk.clusters.N_INIT)")
    args = p.parse_args(argv)

    from sklearn.metrics import adjusted_rand_score

    import dwk.clusters
    from dwk.clusterer import fit_kmeans_mode
    from dwk.clusters import noise_kernels
    from dwk.config import ClusterConfig
    from dwk.normalize import normalize_block
    from dwk.planted import planted_population

    if args.n_init:
        dwk.clusters.N_INIT = args.n_init
    shape = tuple(int(v) for v in args.shape.split("x"))
    print(f"{args.shape}, {args.n:,} kernels per population; refine {not args.no_refine}, dissolve borders "
          f"{not args.no_dissolve}, k-means restarts {dwk.clusters.N_INIT}")
    print(f"{'population':>10s} {'seeds':>9s} {'merge_cos':>9s} {'stability min':>13s} {'mean':>6s} {'ARI':>6s}  dissolved")
    for run in args.runs.split(","):
        pop, seed = (int(v) for v in run.split(":"))
        k, lab = planted_population(args.n, shape, noise_share=0.2, snr=2.0, seed=pop)
        x = normalize_block(k.reshape(args.n, -1), "l2").astype(np.float64)
        noise = noise_kernels(20000, x.shape[1], "l2", seed=11)
        cc = ClusterConfig(seed=seed, refine=not args.no_refine, dissolve_blends=not args.no_dissolve)
        f, sel = fit_kmeans_mode(x, noise, cc, shape)
        s = lab >= 0
        ari = adjusted_rand_score(lab[s], f.clusterer.predict(x[s]))
        st = sel["seed_stability"]
        borders = ", ".join("+".join(d["blend_of"]) for d in sel.get("dissolved", [])) or "-"
        print(f"{pop:10d} {f'{seed}-{seed + 2}':>9s} {sel['merge_cos']:9.2f} {st['ari_min']:13.3f} {st['ari_mean']:6.3f} "
              f"{ari:6.3f}  {borders}", flush=True)


if __name__ == "__main__":
    main()
