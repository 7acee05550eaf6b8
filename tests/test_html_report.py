"""report.html: one self-contained page per run (checkpoint table, galleries, per-layer figures, controls)."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from dwk import html_report, report

CHROMIUM = shutil.which("chromium")
TAUS = np.linspace(0, 1, 11).tolist()


# ----------------------------------------------------------------------------- a small synthetic run
def _cluster(i, name, share, rng, n=9, minor=False):
    return dict(id=i, name=name, size=int(share * 1000), share=share, minor=minor, classified_share=0.5 + i / 20,
                reference=dict(name=name if not name.startswith("unnamed") else "dog-on", cos=0.9 - i / 50),
                prototype=rng.normal(size=n).tolist())


def _group(shape, names, rng):
    n = int(np.prod([int(x) for x in shape.split("-")[-1].split("x")]))
    clusters = [_cluster(i, nm, round(0.5 / (i + 1), 4), rng, n, minor=i == len(names) - 1) for i, nm in enumerate(names)]
    return dict(shape=shape, n_kernels=1000, n_fit=1000, n_dead=2, mode="kmeans", tau=0.7, tau_null=0.8123,
                classified_share=0.4567, classified_share_tau=0.789, clusters=clusters,
                tau_curve=dict(tau=TAUS, fit=np.linspace(1, 0, 11).tolist(), null=np.linspace(1, 0, 11).tolist()),
                controls=dict(noise=dict(classified_share_tau_null=0.011, classified_share_tau=0.07),
                              seed_stability=dict(ari_mean=0.91, ari_min=0.88)),
                planted={"planted-x": dict(ari=0.42)})


def synthetic_summary():
    rng = np.random.default_rng(0)
    shapes = {"3x3": _group("3x3", ["gauss-on", "dog-off", "unnamed-0"], rng),
              "5x5": _group("5x5", ["d1-000", "gauss-off"], rng)}
    base = dict(n_dead=3, classified_share_tau=0.85, shapes=["3x3", "5x5"], tau_curve=np.linspace(1, 0, 11).tolist())
    checkpoints = [
        dict(base, id="convnext_atto.d2_in1k", source="timm", role="subject", control=False, n_kernels=1840,
             classified_share=0.912, top_clusters=["gauss-on 41%", "dog-off 9%"], data="in1k", resolution=224),
        dict(base, id="tv-mobilenet", source="torchvision", role="subject", control=False, n_kernels=700,
             classified_share=0.7404, top_clusters=["dog-off 12%"], data="IMAGENET1K_V1", top1=71.878),
        dict(base, id="null-convnext_atto", source="random", role="control", control=True, n_kernels=1840,
             classified_share=0.0099, top_clusters=[]),
        dict(base, id="planted-x", source="planted", role="method-check", control=False, n_kernels=500,
             classified_share=0.38, top_clusters=["d1-000 6%"]),
    ]
    failed = [dict(id="broken<1>", source="file", error="cannot read a&b.safetensors: <b>header too large</b> " + "x" * 120)]
    layers = [dict(checkpoint=c["id"], layer=j, shape=sh, depth=j / 2, classified_share=0.5, n_kernels=10,
                   cluster_shares={"gauss-on": 0.3, "dog-off": 0.2}, tau_curve=np.linspace(1, 0, 11).tolist())
              for c in checkpoints for j, sh in enumerate(["3x3", "5x5", "3x3"])]
    summary = dict(run_id="test-20261125-000000-abcdef", mlflow_run_id="0123456789abcdef0123456789abcdef",
                   store="/tmp/some/store.zarr", out="/tmp/some/runs/test-20261125-000000-abcdef",
                   config=dict(name="tiny-html", experiment="dwk-test"), checkpoints=checkpoints, failed=failed,
                   shapes=shapes, layers=layers, finished=True)
    summary["controls"] = report.controls_rows(summary)
    return summary


def synthetic_figures(summary):
    """Real matplotlib figures, named as pipeline.finalize names them."""
    figs = {}
    for shape, s in summary["shapes"].items():
        figs[f"gallery-{shape}.png"] = report.gallery(s)
        figs[f"tau-curve-{shape}.png"] = report.tau_curve_figure(s)
    for r in summary["checkpoints"][:2]:
        figs[f"layers-{r['id']}.png"] = report.layer_shares(summary["layers"], r["id"])
        figs[f"tau-layers-{r['id']}.png"] = report.layer_tau_curves(summary["layers"], r["id"], TAUS,
                                                                    {"3x3": 0.81, "5x5": 0.6})
    figs["tau-curve-checkpoints.png"] = report.checkpoint_tau_curves(summary["checkpoints"], TAUS)
    return figs


@pytest.fixture(scope="module")
def rendered():
    import matplotlib.pyplot as plt

    summary = synthetic_summary()
    figs = synthetic_figures(summary)
    try:
        yield summary, figs, html_report.render(summary, figs)
    finally:
        for f in figs.values():
            plt.close(f)


# ----------------------------------------------------------------------------- parsing the page
class Page(HTMLParser):
    """Tags with attributes, and the text of every table cell by table class."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self._table = self._row = self._cell = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table = self.tables.setdefault(a.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def images(self) -> list[dict]:
        return [a for t, a in self.tags if t == "img"]


def decoded_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix):], validate=True)
    Image.open(io.BytesIO(data)).verify()  # a whole, valid PNG
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


def assert_self_contained(html: str, page: Page):
    assert not re.search(r"https?://", html, re.I)  # no URL anywhere, so no request either
    for tag, a in page.tags:
        for attr in ("src", "href", "srcset", "poster", "data", "action"):
            v = a.get(attr)
            if v is not None:
                assert v.startswith(("data:image/png;base64,", "#")), (tag, attr, v[:60])
        assert tag not in ("link", "iframe", "object", "embed", "base")
        assert not (tag == "script" and "src" in a)
    assert "url(" not in html and "@import" not in html  # CSS pulls nothing in


# ----------------------------------------------------------------------------- tests
def test_render_is_self_contained_and_shows_the_summary(rendered):
    summary, figs, html = rendered
    page = Page(html)
    assert_self_contained(html, page)

    imgs = page.images()
    assert len(imgs) == len(figs) and {i["alt"] for i in imgs} == set(figs)
    for i in imgs:
        assert decoded_png(i["src"]).size[0] > 100
    assert sum("gallery" in i.get("class", "") for i in imgs) == len(summary["shapes"])

    # the checkpoint table: the text table's cells, row by row, failed checkpoint last
    rows = summary["checkpoints"] + summary["failed"]
    head, *body = page.tables["checkpoints"]
    text_lines = report.checkpoint_table_text(rows).splitlines()
    assert head[:4] == ["checkpoint", "role", "source", "trained on"] and len(body) == len(text_lines) - 2
    assert [b[0] for b in body] == [r["id"] for r in rows]
    for cells, line in zip([head, *body], text_lines[:1] + text_lines[2:]):
        pos = 0
        for c in cells:  # every cell, in order, as the text table prints it
            pos = line.index(c, pos) + len(c)
    first, tv, null, planted, broken = body
    assert first[1] == "trained" and first[3] == "in1k, 224px" and "91.2%" in first and "85.0%" in first
    assert tv[3] == "IMAGENET1K_V1, top-1 71.9%" and "74.0%" in tv
    assert null[1] == "control (random init)" and "1.0%" in null
    assert planted[1] == "method check (planted)" and "d1-000 6%" in planted
    assert "FAILED" in broken

    # failed checkpoints with their whole reason, escaped (text, not markup)
    failed = page.tables["failed"]
    assert failed[1] == ["broken<1>", "file", summary["failed"][0]["error"]]
    assert not any(t == "b" for t, _ in page.tags)
    assert "&lt;b&gt;header too large&lt;/b&gt;" in html and "a&amp;b.safetensors" in html

    # run facts
    meta = dict(r for r in page.tables["meta"])
    assert meta["run id"] == summary["run_id"] and meta["config"] == "tiny-html"
    assert meta["MLflow run id"] == summary["mlflow_run_id"] and meta["store"] == summary["store"]
    assert meta["checkpoints"] == "4 analysed, 1 failed"

    # per group: facts and clusters (name, share, classified share, nearest reference, cosine)
    facts = page.tables["facts"]
    assert len(facts) == 2 * len(summary["shapes"])
    assert dict(zip(*facts[:2]))["tau_null"] == "0.812" and dict(zip(*facts[:2]))["planted ARI"] == "planted-x 0.42"
    clusters = page.tables["clusters"]
    want = [[str(c["id"]), c["name"], str(c["size"]), f"{c['share']:.1%}", "minor" if c["minor"] else "",
             f"{c['classified_share']:.1%}", c["reference"]["name"], f"{c['reference']['cos']:.2f}"]
            for s in summary["shapes"].values() for c in s["clusters"]]
    assert [r for r in clusters if r[0] != "id"] == want

    # controls: the cells of controls.txt
    controls = page.tables["controls"]
    assert controls[0] == ["shape", "control", "metric", "value"]
    assert controls[1:] == report.controls_table(summary["controls"])[1]
    assert ["3x3", "seed stability", "ari_min", "0.88"] in controls


def test_render_rejects_what_is_not_a_png(rendered):
    summary, _, _ = rendered
    with pytest.raises(ValueError, match="not a PNG"):
        html_report.render(summary, {"gallery-3x3.png": b"GIF89a..."})


def chromium_dom(path: Path) -> str:
    """The DOM of a local file after load, from headless Chromium (the flags this machine needs)."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                              "--dump-dom", path.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def loaded_counts(dom: str) -> tuple[str, str]:
    body = dict(next(a for t, a in Page(dom).tags if t == "body"))
    return body["data-images-loaded"], body["data-gallery-loaded"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian package `chromium`; .ci/run installs it)")
def test_report_opens_in_headless_chromium(rendered, tmp_path):
    summary, figs, _ = rendered
    path = html_report.write(tmp_path / "report.html", summary, figs)
    n, g = len(figs), len(summary["shapes"])
    assert loaded_counts(chromium_dom(path)) == (f"{n}/{n}", f"{g}/{g}")

    # the count is the browser's: a gallery image that does not decode is not counted
    html = path.read_text()
    gallery_src = next(i["src"] for i in Page(html).images() if "gallery" in i.get("class", ""))
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace(gallery_src, "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode()))
    assert loaded_counts(chromium_dom(broken)) == (f"{n - 1}/{n}", f"{g - 1}/{g}")


def test_pipeline_writes_and_logs_report(tmp_path, mlflow_uri):
    """A real (tiny) run: finalize writes report.html next to summary.json and logs it to MLflow."""
    import mlflow

    from dwk import pipeline

    cfg = tiny_config(tmp_path, name="html-report", checkpoints=[
        dict(id="planted-test_convnext", arch="test_convnext", planted=dict(seed=0, noise_share=0.1)),
        dict(id="null-test_convnext", arch="test_convnext", pretrained=False, seed=0),
        dict(id="unknown", arch="not_a_timm_model", pretrained=False),
    ], autoencoder=dict(epochs=4, batch_size=128), cluster=dict(n_init_clusters=12, n_null=500))
    s = pipeline.run(cfg)  # tracked: report.html goes to MLflow too
    out = cfg.out / s["run_id"]
    html = (out / "report.html").read_text()
    page = Page(html)
    assert_self_contained(html, page)

    ids = [r[0] for r in page.tables["checkpoints"][1:]]
    assert ids == [r["id"] for r in s["checkpoints"] + s["failed"]]
    assert {"planted-test_convnext", "null-test_convnext", "unknown"} == set(ids)
    assert page.tables["failed"][1][0] == "unknown" and "timm has no model" in page.tables["failed"][1][2]
    meta = dict(page.tables["meta"])
    assert meta["run id"] == s["run_id"] and meta["config"] == "html-report" and meta["MLflow run id"] == s["mlflow_run_id"]
    saved = sorted(p.name for p in (out / "figures").glob("*.png"))
    imgs = page.images()
    assert sorted(i["alt"] for i in imgs) == saved
    for i in imgs:  # the PNGs of figures/, byte for byte
        assert base64.b64decode(i["src"].split(",", 1)[1]) == (out / "figures" / i["alt"]).read_bytes()
    assert sum("gallery" in i.get("class", "") for i in imgs) == len(s["shapes"])

    arts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(s["mlflow_run_id"])}
    assert "report.html" in arts
    if CHROMIUM:
        n, g = len(saved), len(s["shapes"])
        assert loaded_counts(chromium_dom(out / "report.html")) == (f"{n}/{n}", f"{g}/{g}")
