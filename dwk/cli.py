"""The ``dwk`` command line.

``dwk run`` runs the pipeline flow (Prefect server when ``PREFECT_API_URL`` is set, Prefect's
ephemeral mode otherwise) and prints the per-checkpoint table and where the results are.
``dwk extract`` and ``dwk analyze`` run the two stages alone; ``dwk show`` prints a finished run.
``--set KEY=VALUE`` overrides config values (``dwk.config.apply_sets``); ``dwk config show`` prints the
config a run would use. Progress bars (``dwk.progress``) show per stage when stderr is a terminal.

Exit status, the same rule in every command: 0 when everything succeeded; 1 when a checkpoint
failed (0 with ``--allow-partial`` when at least one succeeded), or a store is damaged (``verify``);
2 for a user error (dwk's own errors: a bad config, a missing file, an unusable tracking store;
``-v`` adds the traceback); 130 on Ctrl-C and 143 on SIGTERM. Any other exception is a bug or an
environment failure and keeps its traceback.
"""
from __future__ import annotations

import argparse
import atexit
import fcntl
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from dwk.errors import ConfigError, DwkError, Interrupted, MissingInputError

logger = logging.getLogger(__name__)

STOP_GRACE_S = float(os.environ.get("DWK_STOP_GRACE_S", "30"))  # after SIGTERM, exit hard after this long


def _setup_logging(verbose: bool) -> None:
    # dwk's own loggers show up in Prefect's run logs (and its UI) beside the flow's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dwk")
    # dwk logs outside flow runs too (preflight, tracking): those lines are not flow-run logs, no warning.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:  # dwk's logger has a level of its own (INFO, see dwk/__init__.py)
        logging.getLogger("dwk").setLevel(logging.DEBUG)
    import distributed  # noqa: F401 - importing it resets its loggers to INFO: import first, then quiet them

    for noisy in ("distributed", "alembic", "matplotlib", "urllib3", "httpx", "mlflow", "torch", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _validation_message(where: str, err) -> str:
    """A pydantic ValidationError as one line per field path: ``checkpoints[2].arch: message``.

    Each line says what to do: an unknown key names the closest allowed key and the allowed ones, a
    missing key says to add it, a wrong value shows the value given.
    """
    from dwk.config import set_path_text

    lines = []
    for e in err.errors(include_url=False):
        path = set_path_text(list(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = _unknown_key_hint(err.title, list(e["loc"]))
        elif e["type"] == "missing":
            msg = f"required, but not given: add it to the config (or --set {path}=VALUE)"
        elif isinstance(e.get("input"), (str, int, float, bool)) and len(repr(e["input"])) <= 60:
            msg += f" (got {e['input']!r})"
        lines.append(f"  {path or '(top level)'}: {msg}")
    return f"{where} is not valid ({len(lines)} problem{'s' if len(lines) != 1 else ''}):\n" + "\n".join(lines)


def _unknown_key_hint(model_name: str, loc: list) -> str:
    """``unknown key; did you mean 'autoencoder'? allowed here: ...`` for an extra key at ``loc``."""
    import difflib

    model = _model_at(model_name, loc[:-1])
    if model is None:
        return "unknown key: remove it"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {guess}allowed here: {', '.join(allowed)}"


def _model_at(model_name: str, loc: list):
    """The pydantic model of dwk.config (named ``model_name``) found at ``loc`` inside it, or None."""
    import typing

    from pydantic import BaseModel

    from dwk import config

    def model_in(tp):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp
        return next((m for m in map(model_in, typing.get_args(tp)) if m is not None), None)

    model = getattr(config, model_name, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    for part in loc:
        if isinstance(part, int):
            continue  # a list's item: the model of the list's items
        field = model.model_fields.get(part)
        model = model_in(field.annotation) if field is not None else None
        if model is None:
            return None
    return model


def _config(args: argparse.Namespace):
    from pydantic import ValidationError

    from dwk.config import load_config

    where = f"config {args.config}" if args.config else "the embedded config"
    try:
        return load_config(args.config, sets=getattr(args, "set", None) or (), store=args.store, out=args.out)
    except DwkError:
        raise
    except ValidationError as e:
        raise ConfigError(_validation_message(where, e)) from e
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from e
    except ValueError as e:  # load_config's own checks (top-level mapping, patterns that match nothing)
        raise ConfigError(f"{where}: {e}") from e


def _open_store(path: Path):
    from dwk.store import KernelStore

    try:
        return KernelStore(path, create=False)
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from e


def _outcome(n_ok: int, failed: list[dict], done: str, allow_partial: bool) -> int:
    """The last lines of a command over checkpoints, and its exit status (see the module's doc)."""
    if not failed:
        return 0
    total = n_ok + len(failed)
    print(f"\n{len(failed)} of {total} checkpoint(s) failed: {', '.join(f['id'] for f in failed)}; "
          f"the other {n_ok} were {done}.")
    if allow_partial:
        print("exit status 0 (--allow-partial). Fix the failed ones and re-run: stored checkpoints are skipped.")
        return 0
    print("exit status 1 (--allow-partial accepts a partial result). Fix the failed ones and re-run: "
          "stored checkpoints are skipped.")
    return 1


# ----------------------------------------------------------------------------- Prefect's ephemeral server
_prefect_slot_lock = None  # the open lock file of this process's ephemeral-database slot


def _isolate_prefect_database() -> str | None:
    """Give this process an ephemeral Prefect database no other dwk process uses at the same time.

    Without ``PREFECT_API_URL`` Prefect starts a temporary server on ``$PREFECT_HOME/prefect.db``;
    several processes sharing it fail with "database is locked". Each process takes the first free
    slot (a lock held for the process's life): slot 0 is Prefect's default database, slot i a
    database of its own under ``$PREFECT_HOME/dwk-ephemeral/`` (migrated once, then reused). Must run
    before prefect is imported; does nothing when a server or a database is configured. Returns the
    database URL it chose (None: Prefect's choice).
    """
    global _prefect_slot_lock
    if "prefect" in sys.modules or _prefect_slot_lock is not None:
        return None
    if any(os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                                       "PREFECT_API_DATABASE_CONNECTION_URL")):
        return None
    # The temporary server starts slowly when several start at once on few cores (default: 20 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The temporary server's telemetry heartbeat writes while it migrates: "database is locked" noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    slots = home / "dwk-ephemeral"
    try:
        slots.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logger.warning("cannot create %s (%s): Prefect's default database is used", slots, e)
        return None
    for i in range(256):
        f = open(slots / f"slot-{i}.lock", "a")  # noqa: SIM115 - held open for the process's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _prefect_slot_lock = f
        atexit.register(f.close)
        if i == 0:
            return None
        url = f"sqlite+aiosqlite:///{slots / f'prefect-{i}.db'}"
        os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url
        logger.info("another dwk process uses Prefect's temporary server: this one uses %s (for one shared "
                    "server with the runs' history: `prefect server start` and set PREFECT_API_URL)", url)
        return url
    raise DwkError("256 dwk processes already run with temporary Prefect servers here: start one with "
                   "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")


# ----------------------------------------------------------------------------- signals
def _on_stop_signal(signum: int, frame) -> None:
    """SIGTERM: raise ``Interrupted`` in the main thread, so every stage unwinds (MLflow run KILLED).

    A second SIGTERM, or a first that has not ended the process after ``DWK_STOP_GRACE_S``, exits at
    once (open MLflow runs are marked KILLED first when that can be done in a few seconds).
    """
    if getattr(_on_stop_signal, "fired", False):
        os._exit(128 + signum)
    _on_stop_signal.fired = True

    def hard_stop() -> None:
        import time

        time.sleep(STOP_GRACE_S)
        logger.error("still running %.0fs after %s: exiting now", STOP_GRACE_S, signal.Signals(signum).name)
        if "dwk.tracking" in sys.modules:
            closer = threading.Thread(target=sys.modules["dwk.tracking"].end_open_runs,
                                      args=("KILLED", f"{signal.Signals(signum).name}: hard stop"), daemon=True)
            closer.start()
            closer.join(5)
        os._exit(128 + signum)

    threading.Thread(target=hard_stop, name="dwk-hard-stop", daemon=True).start()
    raise Interrupted(signum)


def _signal_of(exc: BaseException) -> int | None:
    """The signal behind an interrupt: ``Interrupted``, Prefect's ``TerminationSignal``, Ctrl-C."""
    if isinstance(exc, Interrupted):
        return exc.signum
    if any(t.__name__ == "TerminationSignal" for t in type(exc).__mro__):
        return int(getattr(exc, "signal", signal.SIGTERM))
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    return None


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
    if summary.get("finished") is False:
        print(f"run {summary['run_id']} has not finished: groups without a result are left out; "
              f"`dwk run --resume {summary['run_id']}` goes on with it")
    print(f"results:  {summary['out']}  (summary.json, checkpoints.txt, controls.txt, figures/)")
    print(f"store:    {summary['store']}")
    if summary.get("mlflow_run_id"):
        print(f"mlflow:   run {summary['mlflow_run_id']} in experiment '{summary['config']['experiment']}' "
              f"at {tracking.tracking_uri()}")
        print(f"          browse: {tracking.ui_hint()}")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    track = not args.no_track
    if track:
        from dwk import tracking

        tracking.preflight()  # in seconds, before Prefect's server or any work starts
    if args.resume:
        _open_store(cfg.store)  # a clear error when there is no store
    if args.no_prefect:
        from dwk import pipeline

        summary = pipeline.run(cfg, track=track, resume=args.resume)
    else:
        _isolate_prefect_database()
        from flows.pipeline import pipeline_flow

        summary = pipeline_flow(cfg, track=track, resume=args.resume)
    _print_result(summary)
    return _outcome(len(summary["checkpoints"]), summary["failed"], "analysed", args.allow_partial)


def cmd_extract(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _isolate_prefect_database()
    from flows.extract import bounded

    result = bounded(cfg)(cfg)
    for e in result["extracted"]:
        print(f"{e['status']:>9}  {e['id']}: {e['n_kernels']} kernels {e['shapes']}")
    for f in result["failed"]:
        print(f"{'FAILED':>9}  {f['id']}: {f['error']}")
    print(f"store: {cfg.store.resolve()}")
    return _outcome(len(result["extracted"]), result["failed"], "extracted", args.allow_partial)


def cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse the checkpoints of a config that are already in the store (no extraction)."""
    from dwk import pipeline, sources, tracking

    cfg = _config(args)
    store = _open_store(cfg.store)
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
    if not args.no_track:
        tracking.preflight()
    _isolate_prefect_database()
    from flows.analyze import analyze_flow

    run_id = pipeline.new_run_id(cfg)
    mlflow_run_id = None if args.no_track else pipeline.open_tracking(cfg, run_id, None)
    with tracking.closed_on_error(mlflow_run_id):
        summary = analyze_flow(cfg, run_id, extracted, missing, mlflow_run_id)
    _print_result(summary)
    return _outcome(len(summary["checkpoints"]), summary["failed"], "analysed", args.allow_partial)


def _default_store(args: argparse.Namespace) -> Path:
    """``--store``, else the embedded config's store (where ``dwk run`` writes by default)."""
    from dwk.config import load_config

    return args.store or load_config(None).store


def cmd_show(args: argparse.Namespace) -> int:
    from dwk.export import load_summary

    try:
        summary = load_summary(args.run, _default_store(args))[0]
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from e
    _print_result(summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dwk.export import export_run

    try:
        path = export_run(args.run, args.output, args.format, _default_store(args))
    except FileNotFoundError as e:
        if not Path(args.run).exists():
            raise MissingInputError(str(e)) from e
        raise
    print(f"wrote {path}")
    return 0


def cmd_sources(args: argparse.Namespace) -> int:
    """Preview what a timm pattern selects: the ``arch.tag`` checkpoints with their training data."""
    from dwk import timm_registry
    from dwk.config import CheckpointPattern
    from dwk.sources import hub

    pat = CheckpointPattern(pattern=args.patterns or ["*"], module=args.module or None, exclude=args.exclude or [],
                            max_checkpoints=10**6)
    try:
        names = timm_registry.expand(pat)
    except ValueError as e:  # a pattern that matches nothing, or too much
        raise ConfigError(str(e)) from e
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
    failed, n_ok = [], 0
    for name, res in hub.prefetch(names, max_workers=args.workers).items():
        if isinstance(res, Exception):
            failed.append(dict(id=name, error=getattr(res, "reason", str(res))))
            print(f"{'FAILED':>9}  {name}: {failed[-1]['error']}", file=sys.stderr)
        else:
            n_ok += 1
            print(f"{'cached':>9}  {name}: {res.path}")
    return _outcome(n_ok, failed, "cached", args.allow_partial and n_ok > 0)


def cmd_gc(args: argparse.Namespace) -> int:
    """List runs of a store whose process died before they finished (kill -9, a crash); --remove deletes them.

    A run of a live process on this host is never listed; one whose process ran on another host is
    listed once it is older than --older-than-hours. Checkpoints are never touched.
    """
    store = _open_store(args.store)
    orphans = store.orphaned_runs(max_age_s=args.older_than_hours * 3600)
    for run_id, why in orphans:
        if args.remove:
            store.delete_run(run_id)
        print(f"{'REMOVED' if args.remove else 'ORPHANED'}  {run_id}: {why}")
    print(f"gc: {len(orphans)} orphaned run(s) in {store.path}"
          + ("" if args.remove or not orphans else "; run again with --remove to delete them"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every checkpoint of a store (checksums of every chunk unless --quick).

    Exit 0 when nothing is damaged, 1 when something is (also with --repair: the repaired checkpoints
    are missing until the next extraction). --repair moves damaged checkpoints aside, so the next
    ``dwk extract`` / ``dwk run`` extracts them again, and removes temporary folders of dead writers.
    """
    import time

    t0 = time.perf_counter()
    store = _open_store(args.store)
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


def cmd_make_dataset(args: argparse.Namespace) -> int:
    """Write a generated ImageFolder (dwk.datasets): the initialisation experiment's tiny data set."""
    from dwk.datasets import make_dataset

    out = make_dataset(args.out, classes=args.classes, per_class=args.per_class, val_per_class=args.val_per_class,
                       size=args.size, seed=args.seed, force=args.force)
    print(f"data set: {out} (train/ and val/, one folder per class; parameters in {out / 'dataset.json'})")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """The initialisation experiment (docs/init-experiment.md): train per scheme, track, analyse the kernels."""
    from dwk import classifier

    cfg = classifier.load_experiment(args.config, out=args.out)
    track = not args.no_track
    if track:
        from dwk import tracking

        tracking.preflight()  # in seconds, before any training
    if args.no_prefect:
        result = classifier.run_experiment(cfg, track=track)
    else:
        _isolate_prefect_database()
        from flows.train_classifier import train_classifier_flow

        result = train_classifier_flow(experiment=cfg, track=track)
    print()
    print(classifier.comparison_text(result["schemes"]))
    print(f"\nrun folder: {result['run_dir']}  (checkpoints/, analysis/, results.json)")
    if result.get("parent_run_id"):
        from dwk import tracking

        print(f"mlflow:     run {result['parent_run_id']} in experiment '{cfg.experiment}' at {tracking.tracking_uri()}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the config a run would use (expanded, validated, paths absolute) as YAML, or RunConfig's JSON schema."""
    import json

    import yaml

    from dwk.config import RunConfig

    if args.schema:
        print(json.dumps(RunConfig.model_json_schema(), indent=2))
        return 0
    cfg = _config(args)
    where = args.config.resolve() if args.config else "the embedded config"
    print(f"# {where}, expanded and validated: {len(cfg.checkpoints)} checkpoints "
          "(saved to a file, `--config FILE` runs exactly this)")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120), end="")
    return 0


def cmd_cluster_init(args: argparse.Namespace) -> int:
    """Create or update the Prefect server's global concurrency limits and work pools (flows/cluster.py)."""
    from flows import cluster as cluster_setup

    for action in cluster_setup.init(gpus=args.gpus, downloads=args.downloads):
        print(action)
    return 0


def _version() -> str:
    """dwk's installed version (package metadata), or the source tree's when dwk is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dwk")
    except PackageNotFoundError:
        import dwk

        return dwk.__version__


def _want_progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person at a terminal: stderr a terminal, no --no-progress, not under pytest."""
    return (not getattr(args, "no_progress", True) and sys.stderr.isatty()
            and "PYTEST_CURRENT_TEST" not in os.environ)


SET_HELP = ("override a config value before validation, KEY=VALUE (repeatable): dotted keys, list indices in "
            "brackets, values read as YAML, e.g. --set autoencoder.epochs=5 --set checkpoints[0].seed=1 (indices "
            "count the entries as written in the file; one past the end adds an entry)")
PARTIAL_HELP = "exit 0 when some checkpoints failed and the others succeeded (default: exit 1)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwk", description="Identifiable clusters in trained depthwise kernels, at scale.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks for user errors too")
    p.add_argument("--version", action="version", version=f"dwk {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, out=True, progress=True):
        sp.add_argument("--config", type=Path, help="run config (YAML); default: the embedded planted demo")
        sp.add_argument("--store", type=Path, help="Zarr kernel store (default from the config: runs/store.zarr)")
        if out:
            sp.add_argument("--out", type=Path, help="output folder for runs (default: runs)")
        else:
            sp.set_defaults(out=None)
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
        if progress:
            sp.add_argument("--no-progress", action="store_true",
                            help="no progress bars (they show only when stderr is a terminal)")

    r = sub.add_parser("run", help="the whole pipeline as a Prefect flow")
    common(r)
    r.add_argument("--no-prefect", action="store_true", help="run the stages in this process, without Prefect")
    r.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    r.add_argument("--allow-partial", action="store_true", help=PARTIAL_HELP)
    r.add_argument("--resume", metavar="RUN_ID",
                   help="go on with an unfinished run of the store (killed, failed, stopped), with the config it "
                        "started with; stages it finished are skipped")
    r.set_defaults(func=cmd_run)
    e = sub.add_parser("extract", help="extract the config's checkpoints into the store")
    common(e, out=False)
    e.add_argument("--allow-partial", action="store_true", help=PARTIAL_HELP)
    e.set_defaults(func=cmd_extract)
    a = sub.add_parser("analyze", help="analyse the config's checkpoints already in the store")
    common(a)
    a.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    a.add_argument("--allow-partial", action="store_true", help=PARTIAL_HELP)
    a.set_defaults(func=cmd_analyze)
    run_help = "run folder (runs/<run_id>), its summary.json, or a run id of the store"
    store_help = "Zarr kernel store holding the run (default: the embedded config's, runs/store.zarr)"
    s = sub.add_parser("show", help="print a run's table (from its folder, or from the store alone)")
    s.add_argument("run", help=run_help)
    s.add_argument("--store", type=Path, help=store_help)
    s.set_defaults(func=cmd_show)
    x = sub.add_parser("export", help="write a run's per-kernel table (Parquet or CSV)")
    x.add_argument("run", help=run_help)
    x.add_argument("--store", type=Path, help=store_help)
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
    src.add_argument("--allow-partial", action="store_true", help=PARTIAL_HELP)
    src.set_defaults(func=cmd_sources)
    v = sub.add_parser("verify", help="check every checkpoint of a store; exit 1 on damage")
    v.add_argument("--store", type=Path, required=True, help="Zarr kernel store to check, e.g. runs/store.zarr")
    v.add_argument("--repair", action="store_true",
                   help="move damaged checkpoints aside so the next extraction redoes them")
    v.add_argument("--quick", action="store_true", help="check metadata and chunk files only, no checksums")
    v.set_defaults(func=cmd_verify)
    g = sub.add_parser("gc", help="list (and --remove) runs of a store left unfinished by a dead process")
    g.add_argument("--store", type=Path, required=True, help="Zarr kernel store, e.g. runs/store.zarr")
    g.add_argument("--remove", action="store_true", help="delete the orphaned runs' store groups")
    g.add_argument("--older-than-hours", type=float, default=24.0,
                   help="runs whose process ran on another host count as orphaned after this long (default 24)")
    g.set_defaults(func=cmd_gc)
    cfg_p = sub.add_parser("config", help="see the config a run uses (`dwk config show`) or its schema")
    cfg_sub = cfg_p.add_subparsers(dest="config_cmd", required=True)
    cs = cfg_sub.add_parser("show", help="print the expanded, validated config as YAML (patterns and files: "
                                         "globs expanded, paths absolute), or its JSON schema with --schema")
    common(cs, progress=False)
    cs.add_argument("--schema", action="store_true", help="print the JSON schema of a run config instead")
    cs.set_defaults(func=cmd_config_show)
    md = sub.add_parser("make-dataset", help="write a generated ImageFolder of textures and shapes (tiny experiments)")
    md.add_argument("out", type=Path, help="folder to write (train/ and val/ inside)")
    md.add_argument("--classes", type=int, default=10, help="number of classes, 2 to 10 (default 10)")
    md.add_argument("--per-class", type=int, default=40, help="training images per class (default 40)")
    md.add_argument("--val-per-class", type=int, help="validation images per class (default: a quarter of --per-class)")
    md.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--force", action="store_true", help="replace a non-empty folder that holds something else")
    md.set_defaults(func=cmd_make_dataset)
    tc = sub.add_parser("train-classifier", help="the initialisation experiment: train per init scheme, then analyse")
    tc.add_argument("--config", type=Path, required=True, help="experiment config, e.g. configs/init-experiment-tiny.yaml")
    tc.add_argument("--out", type=Path, help="folder for the experiment's runs (default from the config)")
    tc.add_argument("--no-prefect", action="store_true", help="run the steps in this process, without Prefect")
    tc.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    tc.set_defaults(func=cmd_train_classifier)
    cl = sub.add_parser("cluster", help="set up a Prefect server for dwk (`dwk cluster init`, docs/cluster.md)")
    cl_sub = cl.add_subparsers(dest="cluster_cmd", required=True)
    ci = cl_sub.add_parser("init", help="create or update the global concurrency limits dwk-hub-downloads and dwk-gpu "
                                        "and the work pools dwk-cpu and dwk-gpu (idempotent; needs PREFECT_API_URL)")
    ci.add_argument("--gpus", type=int, default=1,
                    help="GPU trainings at once, cluster-wide: the number of GPUs (default 1)")
    ci.add_argument("--downloads", type=int, default=2,
                    help="Hugging Face Hub downloads at once, cluster-wide (default 2)")
    ci.set_defaults(func=cmd_cluster_init)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if _want_progress(args):
        from dwk import progress

        progress.enable()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_stop_signal) if in_main_thread else None
    try:
        return args.func(args)
    except DwkError as e:  # dwk's own errors: what went wrong and what to do; the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"dwk: error: {e}", file=sys.stderr)
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - interrupts become exit statuses; the rest is re-raised
        signum = _signal_of(e)
        if signum is None:
            raise  # a bug or an environment failure: its traceback
        if args.verbose:
            traceback.print_exc()
        print(f"dwk: stopped by {signal.Signals(signum).name}; stored checkpoints are complete (a re-run "
              "skips them), an interrupted MLflow run is marked KILLED", file=sys.stderr)
        return 128 + signum
    finally:
        if "dwk.progress" in sys.modules:
            sys.modules["dwk.progress"].disable()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            _on_stop_signal.fired = False


if __name__ == "__main__":
    sys.exit(main())
