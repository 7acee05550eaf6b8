"""The ``dwk`` command line.

``dwk run`` runs the pipeline flow (Prefect server when ``PREFECT_API_URL`` is set, Prefect's
ephemeral mode otherwise) and prints the per-checkpoint table and where the results are.
``dwk extract`` and ``dwk analyze`` run the two stages alone; ``dwk show`` prints a finished run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("dwk.cli")


def _setup_logging(verbose: bool) -> None:
    # dwk's own loggers show up in Prefect's run logs (and its UI) beside the flow's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dwk")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import distributed  # noqa: F401 - importing it resets its loggers to INFO: import first, then quiet them

    for noisy in ("distributed", "alembic", "matplotlib", "urllib3", "httpx", "mlflow", "torch", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(args: argparse.Namespace):
    from dwk.config import load_config

    return load_config(args.config, store=args.store, out=args.out)


def _print_result(summary: dict) -> None:
    from dwk import tracking
    from dwk.report import checkpoint_table_text

    print()
    print(checkpoint_table_text(summary["checkpoints"] + summary["failed"]))
    print()
    for shape, s in summary["shapes"].items():
        named = sum(1 for c in s["clusters"] if not c["name"].startswith("unnamed"))
        line = (f"  {shape}: {s['n_kernels']} kernels, {len(s['clusters'])} clusters ({named} named), "
                f"tau_null {s['tau_null']:.3f}, classified {s['classified_share']:.1%} of non-control kernels")
        if "paper" in s:
            line += f" (paper mode: {s['paper']['classified_share']:.1%})"
        aris = [f"{k} {p['ari']:.2f}" for k, p in s.get("planted", {}).items() if p.get("ari") is not None]
        if aris:
            line += f"; planted ARI: {', '.join(aris)}"
        print(line)
    controls = summary.get("controls")
    if controls:
        from dwk.report import controls_text

        print("\ncontrols:")
        print("  " + controls_text(controls).replace("\n", "\n  "))
    print()
    print(f"results:  {summary['out']}  (summary.json, checkpoints.txt, controls.txt, figures/)")
    print(f"store:    {summary['store']}")
    if summary.get("mlflow_run_id"):
        print(f"mlflow:   run {summary['mlflow_run_id']} in experiment '{summary['config']['experiment']}' "
              f"at {tracking.tracking_uri()}")
        print(f"          browse: {tracking.ui_hint()}")
    if summary["failed"]:
        print(f"\n{len(summary['failed'])} checkpoint(s) failed; the others were analysed. Fix them and re-run: "
              "extracted checkpoints are skipped.")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.no_prefect:
        from dwk import pipeline

        summary = pipeline.run(cfg, track=not args.no_track)
    else:
        from flows.pipeline import pipeline_flow

        summary = pipeline_flow(cfg, track=not args.no_track)
    _print_result(summary)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from flows.extract import bounded

    cfg = _config(args)
    result = bounded(cfg)(cfg)
    for e in result["extracted"]:
        print(f"{e['status']:>9}  {e['id']}: {e['n_kernels']} kernels {e['shapes']}")
    for f in result["failed"]:
        print(f"{'FAILED':>9}  {f['id']}: {f['error']}")
    print(f"store: {cfg.store.resolve()}")
    return 1 if result["failed"] else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse the checkpoints of a config that are already in the store (no extraction)."""
    from dwk import pipeline, sources, tracking
    from dwk.store import KernelStore
    from flows.analyze import analyze_flow

    cfg = _config(args)
    store = KernelStore(cfg.store, create=False)
    extracted, missing = [], []
    for spec in cfg.checkpoints:
        rec = store.checkpoint(spec.id)
        if rec and rec.complete:
            extracted.append(dict(id=rec.id, source=rec.source, status="stored", n_kernels=rec.n_kernels,
                                  shapes=rec.shapes, fingerprint=rec.fingerprint))
        else:
            missing.append(dict(id=spec.id, source=sources.kind_of(spec), error="not extracted yet: run `dwk extract` first"))
    if not extracted:
        print(f"none of the config's checkpoints is in {cfg.store}; run `dwk extract` first", file=sys.stderr)
        return 2
    run_id = pipeline.new_run_id(cfg)
    mlflow_run_id = None if args.no_track else tracking.start_run(cfg.experiment, run_id, cfg.flat_params(),
                                                                  {"dwk.run_id": run_id})
    _print_result(analyze_flow(cfg, run_id, extracted, missing, mlflow_run_id))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from dwk.export import load_summary

    _print_result(load_summary(args.run)[0])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dwk.export import export_run

    path = export_run(args.run, args.output, args.format)
    print(f"wrote {path}")
    return 0


def cmd_sources(args: argparse.Namespace) -> int:
    """Preview what a timm pattern selects: the ``arch.tag`` checkpoints with their training data."""
    from dwk import timm_registry
    from dwk.config import CheckpointPattern
    from dwk.sources import hub

    pat = CheckpointPattern(pattern=args.patterns or ["*"], module=args.module or None, exclude=args.exclude or [],
                            max_checkpoints=10**6)
    names = timm_registry.expand(pat)
    rows, summary = timm_registry.describe(names)
    if args.yaml:
        for n in names:
            print(f"  - id: {n}")
    else:
        head = ("checkpoint", "training data", "res", "license", "classes")
        body = [(r["name"], r["data"] or "?", str(r["resolution"] or "?"), str(r.get("license") or "?"),
                 str(r.get("num_classes") or "?")) for r in rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        for line in (head, *body):
            print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
        data = ", ".join(f"{k} {v}" for k, v in summary["data"].items())
        print(f"\n{summary['n_checkpoints']} checkpoints of {summary['n_architectures']} architectures; "
              f"training data (pretrain>finetune): {data}")
    if not args.download:
        return 0
    failed = 0
    for name, res in hub.prefetch(names, max_workers=args.workers).items():
        if isinstance(res, Exception):
            failed += 1
            print(f"{'FAILED':>9}  {name}: {res.reason}", file=sys.stderr)
        else:
            print(f"{'cached':>9}  {name}: {res.path}")
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every checkpoint of a store (checksums of every chunk unless --quick).

    Exit 0 when nothing is damaged, 1 when something is (also with --repair: the repaired checkpoints
    are missing until the next extraction). --repair moves damaged checkpoints aside, so the next
    ``dwk extract`` / ``dwk run`` extracts them again, and removes temporary folders of dead writers.
    """
    import time

    from dwk.store import KernelStore

    t0 = time.perf_counter()
    store = KernelStore(args.store, create=False)
    result = store.verify(full=not args.quick)
    for damage in result.damaged.values():
        for d in damage:
            print(f"DAMAGED  {d}")
    if args.repair:
        for key in result.damaged:
            aside = store.mark_incomplete(key)
            print(f"REPAIRED {key}: moved aside to {aside.name}; the next `dwk extract` or `dwk run` extracts it again")
        for name in store.cleanup():
            print(f"REMOVED  {name}: left by a writer that is gone")
    leftovers = store.verify(full=False).leftovers if args.repair else result.leftovers
    for name in leftovers:
        print(f"LEFTOVER {name}: not a checkpoint (ignored by readers)")
    mode = "metadata and chunk files" if args.quick else "checksums"
    line = (f"verify: {result.n_checkpoints} checkpoints, {result.n_arrays} arrays, {result.n_chunks} chunks "
            f"({result.n_bytes / 1e6:.1f} MB) checked ({mode}) in {time.perf_counter() - t0:.1f}s: "
            f"{len(result.damaged)} damaged")
    if result.damaged:
        line += (f", {len(result.damaged)} moved aside to be extracted again" if args.repair
                 else "; run again with --repair to have them extracted again")
    print(line)
    return 1 if result.damaged else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwk", description="Identifiable clusters in trained depthwise kernels, at scale.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, out=True):
        sp.add_argument("--config", type=Path, help="run config (YAML); default: the embedded planted demo")
        sp.add_argument("--store", type=Path, help="Zarr kernel store (default from the config: runs/store.zarr)")
        if out:
            sp.add_argument("--out", type=Path, help="output folder for runs (default: runs)")
        else:
            sp.set_defaults(out=None)

    r = sub.add_parser("run", help="the whole pipeline as a Prefect flow")
    common(r)
    r.add_argument("--no-prefect", action="store_true", help="run the stages in this process, without Prefect")
    r.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    r.set_defaults(func=cmd_run)
    e = sub.add_parser("extract", help="extract the config's checkpoints into the store")
    common(e, out=False)
    e.set_defaults(func=cmd_extract)
    a = sub.add_parser("analyze", help="analyse the config's checkpoints already in the store")
    common(a)
    a.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    a.set_defaults(func=cmd_analyze)
    s = sub.add_parser("show", help="print a finished run's table")
    s.add_argument("run", help="run folder (runs/<run_id>) or its summary.json")
    s.set_defaults(func=cmd_show)
    x = sub.add_parser("export", help="write a run's per-kernel table (Parquet or CSV)")
    x.add_argument("run", help="run folder (runs/<run_id>) or its summary.json")
    x.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    x.add_argument("--output", type=Path, help="file to write (default: <run folder>/kernels.<format>)")
    x.set_defaults(func=cmd_export)
    src = sub.add_parser("sources", help="preview the timm pretrained checkpoints a pattern selects")
    src.add_argument("patterns", nargs="*", help="timm name patterns, e.g. 'convnext*' 'convnextv2_*.fcmae_ft_*'")
    src.add_argument("--module", action="append", help="only models of this timm module (repeatable), e.g. convnext")
    src.add_argument("--exclude", action="append", help="drop names matching this pattern (repeatable)")
    src.add_argument("--yaml", action="store_true", help="print config entries instead of the table")
    src.add_argument("--download", action="store_true", help="fetch the weights into the Hub cache (HF_HOME)")
    src.add_argument("--workers", type=int, default=2, help="parallel downloads with --download (default 2)")
    src.set_defaults(func=cmd_sources)
    v = sub.add_parser("verify", help="check every checkpoint of a store; exit 1 on damage")
    v.add_argument("--store", type=Path, required=True, help="Zarr kernel store to check, e.g. runs/store.zarr")
    v.add_argument("--repair", action="store_true",
                   help="move damaged checkpoints aside so the next extraction redoes them")
    v.add_argument("--quick", action="store_true", help="check metadata and chunk files only, no checksums")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # config and input errors: say what, not a traceback
        print(f"dwk: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
