"""Figures and tables drawn from a run's summary. Returns objects; saves nothing by itself."""
from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)


def checkpoint_table_text(rows: list[dict]) -> str:
    """The per-checkpoint table as fixed-width text for the terminal."""
    head = ["checkpoint", "source", "kernels", "dead", "classified@tau_null", "classified@tau", "top clusters"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["id"], r["source"], "-", "-", "FAILED", "-", r["error"][:100]])
            continue
        body.append([r["id"], r["source"] + (" (control)" if r.get("control") else ""), str(r["n_kernels"]),
                     str(r["n_dead"]), f"{r['classified_share']:.1%}", f"{r['classified_share_tau']:.1%}",
                     ", ".join(r["top_clusters"])])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)


def gallery(shape_summary: dict, max_clusters: int = 32):
    """Prototype images with name, share and reference cosine, largest cluster first."""
    kh, kw = map(int, shape_summary["shape"].split("x"))
    clusters = shape_summary["clusters"][:max_clusters]
    n = max(len(clusters), 1)
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, c in zip(axes.ravel(), clusters):
        p = np.asarray(c["prototype"]).reshape(kh, kw)
        v = np.abs(p).max() or 1.0
        ax.imshow(p, cmap="RdBu_r", vmin=-v, vmax=v)
        ax.set_title(f"{c['name']}\n{c['share']:.1%}{' minor' if c['minor'] else ''} cos {c['reference']['cos']:.2f}",
                     fontsize=7)
    fig.suptitle(f"{shape_summary['shape']} cluster prototypes ({shape_summary['mode']} mode)", fontsize=9)
    fig.tight_layout()
    return fig


def latent_histogram(shape_summary: dict):
    """Histogram of the 1-D autoencoder code with the paper-mode cluster intervals."""
    paper = shape_summary.get("paper")
    fig, ax = plt.subplots(figsize=(7, 3))
    if paper is None:
        ax.text(0.5, 0.5, "latent code is not 1-D: no intervals", ha="center")
        return fig
    h = paper["code_hist"]
    edges = np.asarray(h["edges"])
    ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="0.6")
    for i, iv in enumerate(paper["intervals"]):
        ax.axvspan(iv["lo"], iv["hi"] + (edges[1] - edges[0]), alpha=0.15, color=f"C{i % 10}")
        ax.text((iv["lo"] + iv["hi"]) / 2, ax.get_ylim()[1] * 0.9, iv["name"], fontsize=6, ha="center", rotation=90)
    ax.set_xlabel("latent code")
    ax.set_ylabel("kernels")
    ax.set_title(f"{shape_summary['shape']}: latent code and paper-mode intervals", fontsize=9)
    fig.tight_layout()
    return fig


def tau_curve_figure(shape_summary: dict):
    c = shape_summary["tau_curve"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(c["tau"], c["fit"], label="kernels")
    ax.plot(c["tau"], c["null"], label="isotropic noise", ls="--")
    ax.axvline(shape_summary["tau"], color="k", lw=0.8, ls=":", label=f"tau {shape_summary['tau']}")
    ax.axvline(shape_summary["tau_null"], color="r", lw=0.8, ls=":", label=f"tau_null {shape_summary['tau_null']:.2f}")
    ax.set_xlabel("tau")
    ax.set_ylabel("classified share")
    ax.legend(fontsize=7)
    ax.set_title(f"{shape_summary['shape']}: classified share over tau", fontsize=9)
    fig.tight_layout()
    return fig


def layer_shares(layer_rows: list[dict], checkpoint: str):
    """Stacked per-layer cluster shares of one checkpoint (the paper's per-layer bars)."""
    rows = [r for r in layer_rows if r["checkpoint"] == checkpoint]
    names = sorted({k for r in rows for k in r["cluster_shares"]})
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(rows) + 2), 3.2))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    cmap = plt.get_cmap("tab20")
    for j, name in enumerate(names):
        v = np.array([r["cluster_shares"].get(name, 0.0) for r in rows])
        ax.bar(x, v, bottom=bottom, label=name, color=cmap(j % 20))
        bottom += v
    ax.set_xticks(x, [f"{r['layer']}\n{r['shape']}" for r in rows], fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of kernels")
    ax.set_title(f"{checkpoint}: classified kernels by cluster and layer", fontsize=9)
    if names:
        ax.legend(fontsize=5, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig
