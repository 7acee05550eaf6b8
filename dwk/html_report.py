"""``report.html``: one self-contained page per run, from its summary and figures.

Everything the page shows comes from the run's summary (``pipeline.summary_from_store``) and its
figures: the checkpoint table (the same cells as ``checkpoints.txt``), the failed checkpoints with
their reasons, per analysis group its facts, cluster gallery and cluster table (name, share,
classified share, nearest reference), per checkpoint the per-layer bars and tau curves, and the
controls (the same cells as ``controls.txt``).

The page makes no request: figures are embedded as ``data:image/png;base64`` URIs, the CSS is inline,
and a Content-Security-Policy forbids any other source. A small inline script counts the images the
browser decoded and sets ``data-images-loaded="N/M"`` (and ``data-gallery-loaded``) on ``<body>``,
which headless checks read.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from dwk import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# what a figure's name says about where it belongs (pipeline.finalize names them so)
GROUP_FIGURES = (("gallery", "cluster prototypes"), ("tau-curve", "classified share over tau"),
                 ("latent", "latent code"))
CHECKPOINT_FIGURES = (("layers", "per-layer cluster shares"), ("tau-layers", "per-layer tau curves"))
RUN_FIGURES = (("tau-curve-checkpoints.png", "classified share over tau, per checkpoint"),
               ("depth-depthwise-vs-regular.png", "depthwise vs regular kernels by depth"))

FigureLike = Any  # a matplotlib Figure, PNG bytes, or the path of a PNG file


def png_bytes(fig: FigureLike) -> bytes:
    """PNG bytes of a matplotlib figure (rendered at the dpi of ``figures/``), of PNG bytes, or of a PNG file."""
    if isinstance(fig, (bytes, bytearray)):
        data = bytes(fig)
    elif isinstance(fig, (str, os.PathLike)):
        data = Path(fig).read_bytes()
    else:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        data = buf.getvalue()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"not a PNG image: {fig!r}")
    return data


def data_uri(fig: FigureLike) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig)).decode("ascii")


def _anchor(prefix: str, name: str) -> str:
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def group_facts(shape: str, s: dict) -> list[tuple[str, str]]:
    """One analysis group's headline numbers, formatted as ``dwk run`` prints them."""
    named = sum(1 for c in s["clusters"] if not c["name"].startswith("unnamed"))
    facts = [("kernels", str(s["n_kernels"])), ("fitted", str(s.get("n_fit", "-"))),
             ("dead", str(s.get("n_dead", "-"))), ("mode", str(s.get("mode", "-"))),
             ("clusters", f"{len(s['clusters'])} ({named} named, {sum(bool(c.get('minor')) for c in s['clusters'])} minor)"),
             ("tau_null", f"{s['tau_null']:.3f}"), ("tau", f"{s['tau']}"),
             ("classified@tau_null", f"{s['classified_share']:.1%} of non-control kernels"),
             ("classified@tau", _pct(s.get("classified_share_tau")))]
    if "paper" in s:
        facts.append(("paper mode", f"{s['paper']['n_clusters']} clusters, classified {s['paper']['classified_share']:.1%}"))
    aris = [f"{k} {p['ari']:.2f}" for k, p in s.get("planted", {}).items() if p.get("ari") is not None]
    if aris:
        facts.append(("planted ARI", ", ".join(aris)))
    return facts


def cluster_rows(s: dict) -> list[list[str]]:
    """Per cluster: id, name, size, share, minor, classified share, nearest reference and its cosine."""
    rows = []
    for c in s["clusters"]:
        ref = c.get("reference") or {}
        rows.append([str(c["id"]), c["name"], str(c["size"]), f"{c['share']:.1%}", "minor" if c.get("minor") else "",
                     _pct(c.get("classified_share")), str(ref.get("name", "-")),
                     "-" if ref.get("cos") is None else f"{ref['cos']:.2f}"])
    return rows


CLUSTER_HEAD = ["id", "name", "kernels", "share", "", "classified share", "nearest reference", "cos"]


def _figure(figures: Mapping[str, FigureLike], used: set[str], name: str, caption: str, cls: str = "") -> dict | None:
    if name not in figures:
        return None
    used.add(name)
    return dict(name=name, caption=caption, uri=data_uri(figures[name]), cls=cls)


def context(summary: dict, figures: Mapping[str, FigureLike]) -> dict:
    """What the template shows; every number is formatted from ``summary``."""
    rows, failed = summary["checkpoints"], summary.get("failed") or []
    used: set[str] = set()
    head, body = report.checkpoint_table(rows + failed)
    table = [dict(cells=cells, cls="failed" if r.get("error") else (r.get("role") or ""))
             for r, cells in zip(rows + failed, body)]
    groups = []
    for shape, s in summary["shapes"].items():
        figs = [_figure(figures, used, f"{kind}-{shape}.png", f"{shape}: {what}", "gallery" if kind == "gallery" else "")
                for kind, what in GROUP_FIGURES]
        groups.append(dict(name=shape, anchor=_anchor("group", shape), facts=group_facts(shape, s),
                           clusters=cluster_rows(s), figures=[f for f in figs if f]))
    checkpoints = []
    for r in rows:
        figs = [_figure(figures, used, f"{kind}-{r['id']}.png", f"{r['id']}: {what}") for kind, what in CHECKPOINT_FIGURES]
        checkpoints.append(dict(name=r["id"], anchor=_anchor("checkpoint", r["id"]), figures=[f for f in figs if f]))
    run_figs = [f for f in (_figure(figures, used, n, what) for n, what in RUN_FIGURES) if f]
    other = [_figure(figures, used, n, n) for n in figures if n not in used]
    controls_head, controls_body = report.controls_table(summary.get("controls") or report.controls_rows(summary))
    cfg = summary.get("config") or {}
    meta = [("run id", summary["run_id"]), ("config", str(cfg.get("name", "-"))),
            ("MLflow run id", summary.get("mlflow_run_id") or "- (not tracked)"),
            ("MLflow experiment", str(cfg.get("experiment", "-"))), ("store", summary.get("store", "-")),
            ("run folder", summary.get("out", "-")),
            ("checkpoints", f"{len(rows)} analysed, {len(failed)} failed"),
            ("analysis groups", ", ".join(summary["shapes"]) or "-"),
            ("finished", "yes" if summary.get("finished") else "no")]
    return dict(run_id=summary["run_id"], meta=meta, head=head, table=table,
                failed=[dict(id=f["id"], source=f.get("source", "-"), error=f.get("error", "-")) for f in failed],
                run_figures=run_figs, groups=groups, cluster_head=CLUSTER_HEAD, checkpoints=checkpoints,
                controls_head=controls_head, controls=controls_body, other=other,
                config=json.dumps(cfg, indent=1, default=str))


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dwk run {{ run_id }}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.control td { color: #666; } tr.method-check td { background: #f8f8ff; } tr.failed td { background: #fff0f0; }
table.meta th { width: 12em; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; }
nav a { margin-right: .8em; } pre { background: #f6f6f6; padding: .5em; overflow: auto; font-size: 12px; }
.error { white-space: pre-wrap; font-family: monospace; }
</style>
</head>
<body data-images-loaded="0/0" data-gallery-loaded="0/0">
<h1>dwk run {{ run_id }}</h1>
<table class="meta">
{% for k, v in meta %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>
{% endfor %}
</table>
<nav><a href="#checkpoints">checkpoints</a>{% if failed %}<a href="#failed">failed</a>{% endif %}<a href="#groups">analysis groups</a>{% for g in groups %}<a href="#{{ g.anchor }}">{{ g.name }}</a>{% endfor %}<a href="#layers">per layer</a><a href="#controls">controls</a><a href="#config">config</a></nav>

<h2 id="checkpoints">Checkpoints</h2>
<table class="checkpoints">
<thead><tr>{% for h in head %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in table %}<tr class="{{ r.cls }}">{% for c in r.cells %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% if failed %}
<h2 id="failed">Failed checkpoints</h2>
<table class="failed">
<thead><tr><th>checkpoint</th><th>source</th><th>reason</th></tr></thead>
<tbody>
{% for f in failed %}<tr><td>{{ f.id }}</td><td>{{ f.source }}</td><td class="error">{{ f.error }}</td></tr>
{% endfor %}
</tbody>
</table>
{% endif %}
{% for f in run_figures %}<figure><img src="{{ f.uri }}" alt="{{ f.name }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}

<h2 id="groups">Analysis groups</h2>
{% for g in groups %}
<section id="{{ g.anchor }}">
<h3>{{ g.name }}</h3>
<table class="facts"><tr>{% for k, v in g.facts %}<th>{{ k }}</th>{% endfor %}</tr><tr>{% for k, v in g.facts %}<td>{{ v }}</td>{% endfor %}</tr></table>
{% for f in g.figures %}<figure><img{% if f.cls %} class="{{ f.cls }}"{% endif %} src="{{ f.uri }}" alt="{{ f.name }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}
<table class="clusters">
<thead><tr>{% for h in cluster_head %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for c in g.clusters %}<tr>{% for v in c %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
</section>
{% endfor %}

<h2 id="layers">Per layer</h2>
{% for c in checkpoints %}
<section id="{{ c.anchor }}">
<h3>{{ c.name }}</h3>
{% for f in c.figures %}<figure><img src="{{ f.uri }}" alt="{{ f.name }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}
</section>
{% endfor %}

<h2 id="controls">Controls</h2>
<table class="controls">
<thead><tr>{% for h in controls_head %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in controls %}<tr>{% for v in r %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% if other %}
<h2 id="other">Other figures</h2>
{% for f in other %}<figure><img src="{{ f.uri }}" alt="{{ f.name }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}
{% endif %}

<h2 id="config">Config</h2>
<details><summary>the run's config</summary><pre>{{ config }}</pre></details>
<script>
window.addEventListener("load", function () {
  function loaded(imgs) {
    var n = 0;
    for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) n++;
    return n + "/" + imgs.length;
  }
  document.body.setAttribute("data-images-loaded", loaded(document.images));
  document.body.setAttribute("data-gallery-loaded", loaded(document.querySelectorAll("img.gallery")));
});
</script>
</body>
</html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(summary: dict, figures: Mapping[str, FigureLike]) -> str:
    """The report of a run as one HTML string.

    ``figures``: name -> matplotlib Figure, PNG bytes or PNG file path, named as ``pipeline.finalize``
    names them (``gallery-<group>.png``, ``layers-<checkpoint>.png``, ...); any other name is shown
    under "Other figures".
    """
    return _ENV.from_string(TEMPLATE).render(**context(summary, figures))


def write(path: str | os.PathLike, summary: dict, figures: Mapping[str, FigureLike]) -> Path:
    """Write ``render(summary, figures)`` to ``path`` (through a temporary file, so a reader never sees half)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(summary, figures), encoding="utf-8")
    tmp.replace(path)
    return path


def write_from_run_dir(run_dir: str | os.PathLike) -> Path:
    """(Re)write ``report.html`` of a finished run folder from its ``summary.json`` and ``figures/*.png``."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = {p.name: p for p in sorted((run_dir / "figures").glob("*.png"))}
    return write(run_dir / "report.html", summary, figures)
