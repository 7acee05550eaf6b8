"""Figures and tables drawn from a run's summary. Returns objects; saves nothing by itself."""
from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dwk.extract import group_shape  # noqa: E402

logger = logging.getLogger(__name__)


ROLE_LABELS = {"subject": "trained", "control": "control (random init)", "method-check": "method check (planted)"}


def checkpoint_table_text(rows: list[dict]) -> str:
    """The per-checkpoint table as fixed-width text for the terminal.

    The ``role`` column tells real (trained) checkpoints from their random-init controls and from
    the planted checks of the method, whose labels are known.
    """
    return _fixed_width(*checkpoint_table(rows))


def checkpoint_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The per-checkpoint table as header and formatted cells (the text table and ``report.html`` show these)."""
    head = ["checkpoint", "role", "source", "kernels", "dead", "classified@tau_null", "classified@tau",
            "top clusters"]
    regular = any("regular_classified_share" in r for r in rows)
    if regular:  # the comparison set: regular convs of the same shapes
        head.insert(7, "regular convs@tau_null")
    trained = any(r.get("data") for r in rows)  # the weights' training data and accuracy, where known
    if trained:
        head.insert(3, "trained on")
    body = []
    for r in rows:
        role = ROLE_LABELS.get(r.get("role"), "-") if not r.get("error") else "-"
        if r.get("error"):
            body.append([r["id"], role, r["source"], "-", "-", "FAILED", "-", r["error"][:100]])
            if regular:
                body[-1].insert(7, "-")
        else:
            body.append([r["id"], role, r["source"], str(r["n_kernels"]), str(r["n_dead"]),
                         f"{r['classified_share']:.1%}", f"{r['classified_share_tau']:.1%}",
                         ", ".join(r["top_clusters"])])
            if regular:
                reg = r.get("regular_classified_share")
                body[-1].insert(7, "-" if reg is None else f"{reg:.1%} of {r['n_regular']}")
        if trained:
            what = (r.get("data"), r.get("resolution") and f"{r['resolution']}px",
                    r.get("top1") and f"top-1 {r['top1']:.1f}%")
            body[-1].insert(3, ", ".join(x for x in what if x) or "-")
    return head, body


def _fixed_width(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)


def gallery(shape_summary: dict, max_clusters: int = 32):
    """Prototype images with name, share and reference cosine, largest cluster first."""
    kh, kw = group_shape(shape_summary["shape"])
    clusters = shape_summary["clusters"][:max_clusters]
    n = max(len(clusters), 1)
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, c in zip(axes.ravel(), clusters):
        p = np.asarray(c["prototype"]).reshape(kh, kw)
        v = np.abs(p).max() or 1.0
        ax.imshow(p, cmap="RdBu_r", vmin=-v, vmax=v)
        title = f"{c['name']}\n{c['share']:.1%}{' minor' if c['minor'] else ''} cos {c['reference']['cos']:.2f}"
        fit = c.get("dog_fit")
        if fit and "sigma" in fit:  # the fitted continuous DoG parameters
            title += f"\ns {fit['sigma']:.2f}" + (f" r {fit['ratio']:.1f}" if "ratio" in fit else "") + (
                f" {fit['angle']:.0f}deg" if "angle" in fit else "") + f" res {fit['residual']:.2f}"
        ax.set_title(title, fontsize=6.5)
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


def layer_tau_curves(layer_rows: list[dict], checkpoint: str, taus: list[float], tau_null: dict[str, float]):
    """Classified share over tau for every layer of one checkpoint (rows: layers, columns: tau), with
    each layer's shape's tau_null marked."""
    rows = [r for r in layer_rows if r["checkpoint"] == checkpoint and "tau_curve" in r]
    fig, ax = plt.subplots(figsize=(6, max(2.0, 0.18 * len(rows) + 1.2)))
    if not rows:
        ax.text(0.5, 0.5, "no layers", ha="center")
        return fig
    im = ax.imshow(np.array([r["tau_curve"] for r in rows]), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                   extent=(taus[0], taus[-1], len(rows) - 0.5, -0.5), interpolation="nearest")
    marks = [(tau_null[r["shape"]], i) for i, r in enumerate(rows) if r["shape"] in tau_null]
    if marks:
        ax.plot(*zip(*marks), "w|", ms=6)
    ax.set_yticks(range(len(rows)), [f"{r['layer']} {r['shape']}" for r in rows], fontsize=5)
    ax.set_xlabel("tau")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="classified share")
    ax.set_title(f"{checkpoint}: classified share over tau, per layer\n(white ticks: tau_null of the layer's shape)",
                 fontsize=8)
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


def controls_rows(summary: dict) -> list[dict]:
    """The controls of a run as flat rows ``{shape, control, metric, value}`` (METHOD 2.7)."""
    rows = []

    def add(shape, control, metric, value):
        if value is not None:
            rows.append(dict(shape=shape, control=control, metric=metric, value=value))

    for r in summary["checkpoints"]:
        if r.get("control"):
            add("all", f"null checkpoint {r['id']}", "classified_share@tau_null", r["classified_share"])
    for shape, s in summary["shapes"].items():
        c = s.get("controls", {})
        add(shape, "isotropic noise", "classified_share@tau_null", c.get("noise", {}).get("classified_share_tau_null"))
        add(shape, "isotropic noise", "classified_share@tau", c.get("noise", {}).get("classified_share_tau"))
        if "seed_stability" in c:
            add(shape, "seed stability", "ari_mean", c["seed_stability"]["ari_mean"])
            add(shape, "seed stability", "ari_min", c["seed_stability"]["ari_min"])
        if "kmeans" in c:
            add(shape, f"k-means (k={c['kmeans']['n_clusters']})", "ari_vs_clusters", c["kmeans"]["ari_vs_clusters"])
            add(shape, f"k-means (k={c['kmeans']['n_clusters']})", "classified_share@own_tau_null",
                c["kmeans"]["classified_share"])
        if "master_key" in c:
            mk = c["master_key"]
            add(shape, "master-key fit", "residual_median", mk["residual_median"])
            add(shape, "master-key fit", "agreement_with_clusters", mk["agreement_with_clusters"])
            add(shape, "master-key fit", "negative_share", mk["negative_share"])
        for ckpt, p in s.get("planted", {}).items():
            for metric in ("ari", "kmeans_ari_true_k", "named_right_share", "structured_classified", "noise_classified"):
                add(shape, f"planted {ckpt}", metric, p.get(metric))
        if "paper" in s:
            add(shape, "paper mode (1-D code)", "n_clusters", s["paper"]["n_clusters"])
            add(shape, "paper mode (1-D code)", "classified_share@tau_null", round(s["paper"]["classified_share"], 4))
            for ckpt, ari in s["paper"].get("planted_ari", {}).items():
                add(shape, "paper mode (1-D code)", f"planted_ari {ckpt}", ari)
        if shape.startswith("regular-"):
            add(shape, "regular convs (comparison set)", "classified_share@tau_null", round(s["classified_share"], 4))
    return rows


def controls_text(rows: list[dict]) -> str:
    return _fixed_width(*controls_table(rows))


def controls_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The controls rows (``controls_rows``) as header and formatted cells."""
    head = ["shape", "control", "metric", "value"]
    body = [[r["shape"], r["control"], r["metric"], f"{r['value']:.4g}" if isinstance(r["value"], float) else str(r["value"])]
            for r in rows]
    return head, body


def checkpoint_tau_curves(rows: list[dict], taus: list[float]):
    """Classified share over tau for every checkpoint (controls dashed)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        if "tau_curve" in r:
            ax.plot(taus, r["tau_curve"], ls="--" if r.get("control") else "-", label=r["id"])
    ax.set_xlabel("tau")
    ax.set_ylabel("classified share")
    ax.legend(fontsize=6)
    ax.set_title("classified share over tau, per checkpoint", fontsize=9)
    fig.tight_layout()
    return fig


def depth_comparison(layer_rows: list[dict]):
    """Classified share by layer depth: depthwise (solid) against regular convs (dashed), per checkpoint.

    The paper's contrast: depthwise kernels stay structured in deep layers, regular ones do not.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ckpts = sorted({r["checkpoint"] for r in layer_rows})
    for j, ckpt in enumerate(ckpts):
        for regular in (False, True):
            rows = sorted((r for r in layer_rows if r["checkpoint"] == ckpt and r["shape"].startswith("regular-") == regular),
                          key=lambda r: r["depth"])
            if rows:
                ax.plot([r["depth"] for r in rows], [r["classified_share"] for r in rows], marker=".",
                        ls="--" if regular else "-", color=f"C{j % 10}",
                        label=f"{ckpt} ({'regular' if regular else 'depthwise'})")
    ax.set_xlabel("normalised depth")
    ax.set_ylabel("classified share")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=5)
    ax.set_title("depthwise vs regular kernels by depth", fontsize=9)
    fig.tight_layout()
    return fig
