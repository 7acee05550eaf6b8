"""Normalisation: in-memory NumPy baseline vs ``dwk.normalize.normalize_shape`` on Dask (sync and LocalCluster).

A real Zarr kernel store (``KernelStore`` in a temporary folder) is filled with N synthetic 7x7
kernels spread over several checkpoints and many layers (with a few dead and non-finite kernels, so
every status path runs). Three implementations normalise the same kernels into a run array:
(a) the baseline, a plain in-memory NumPy version that reads every checkpoint with ``[:]``,
concatenates, computes the status with ``kernel_status``, normalises with ``normalize_block`` and
writes the result with one assignment into a pre-created Zarr array; (b) ``normalize_shape`` on
Dask's synchronous scheduler (out of core, one thread, in-process); (c) ``normalize_shape`` on a
``distributed.LocalCluster`` of 2 worker processes with 1 thread each (the arguments of
``dwk.pipeline.dask_client``). Each variant runs in a fresh subprocess per repetition, so peak
memory is that process's own: the peak RSS is reset before the call (Linux ``/proc/self/clear_refs``)
and read from ``getrusage`` after it; the LocalCluster's worker processes are sampled with psutil.
We print medians of wall time and peak RSS growth and their ratios to the baseline measured in the
same run: the point is to show what the out-of-core path costs in time and what it saves in memory
(the baseline needs several copies of the whole shape group; the Dask paths a few chunks), and to
check that all three write the same normalised array.

Run: ``.venv/bin/python benchmarks/bench_normalize.py`` (``--help`` for sizes; the default, 500,000
kernels x 3 repetitions, takes about 75 s on 2 cores; ``--n-kernels 2000000 --repeats 1`` about 100 s).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _load import OtherLoad  # benchmarks/ is the script's folder, so on sys.path

SHAPE = "7x7"
VARIANTS = ("numpy", "sync", "distributed")
LABELS = {
    "numpy": "numpy in-memory (baseline)",
    "sync": "normalize_shape, dask sync",
    "distributed": "normalize_shape, LocalCluster 2x1",
}


# ----------------------------------------------------------------------------- the synthetic store
def ckpt_ids(n_ckpts: int) -> list[str]:
    return [f"synthetic-{c:02d}" for c in range(n_ckpts)]


def build_store(path: Path, n_kernels: int, n_ckpts: int, channels: int, store_chunk: int, seed: int) -> None:
    """Write ``n_kernels`` synthetic 7x7 kernels over ``n_ckpts`` checkpoints of ``channels``-wide layers."""
    from dwk.extract import Extracted, Layer
    from dwk.store import KernelStore

    store = KernelStore(path)
    rng = np.random.default_rng(seed)
    sizes = [n_kernels // n_ckpts + (1 if c < n_kernels % n_ckpts else 0) for c in range(n_ckpts)]
    for cid, n in zip(ckpt_ids(n_ckpts), sizes):
        n_layers = -(-n // channels)
        widths = [min(channels, n - i * channels) for i in range(n_layers)]
        layers = [
            Layer(layer_index=i, module=f"stages.{i}.conv_dw", shape=SHAPE, stride=(1, 1), dilation=(1, 1),
                  padding="3x3", in_channels=w, out_channels=w, multiplier=1,
                  depth=i / (n_layers - 1) if n_layers > 1 else 0.0, norm_after=True, param=f"stages.{i}.conv_dw.weight")
            for i, w in enumerate(widths)
        ]
        layer = np.repeat(np.arange(n_layers, dtype=np.int32), widths)
        channel = np.concatenate([np.arange(w, dtype=np.int32) for w in widths])
        k = rng.standard_normal((n, 7, 7), dtype=np.float32)
        k *= np.logspace(-2, 0, n_layers, dtype=np.float32)[layer][:, None, None]  # per-layer scale
        u = rng.random(n)
        k[u < 0.005] = 0.0                                   # dead (absolute)
        k[(u >= 0.005) & (u < 0.007)] *= 1e-5                # dead relative to the layer's maximum
        k[(u >= 0.007) & (u < 0.0071), 3, 3] = np.nan         # non-finite
        k[(u >= 0.0071) & (u < 0.0072), 0, 0] = np.inf
        ex = Extracted(layers=layers, kernels={SHAPE: k}, layer={SHAPE: layer}, channel={SHAPE: channel})
        store.write_checkpoint(cid, source="random", fingerprint=f"bench-{seed}", extractor_version=0,
                               extracted=ex, chunk_kernels=store_chunk)


def new_run(store, run_id: str, ids: list[str]) -> None:
    store.create_run(run_id, dict(checkpoints=[dict(id=i, source="random", control=False) for i in ids],
                                  shapes=[SHAPE], offsets={}))


# ----------------------------------------------------------------------------- the baseline
def numpy_normalize(store, run_id: str, ids: list[str], cfg, chunk_kernels: int) -> None:
    """The plain in-memory version: whole arrays, then one write."""
    from dwk.normalize import kernel_status, normalize_block
    from dwk.store import STATUS_OK

    x = np.concatenate([store.kernels(cid, SHAPE)[:] for cid in ids])
    x = x.reshape(len(x), -1)
    layer_ids, base = [], 0
    for cid in ids:  # layer indices offset per checkpoint, as normalize_shape does
        lay = store.kernel_index(cid, SHAPE)["layer"]
        layer_ids.append(lay.astype(np.int64) + base)
        base += int(lay.max()) + 1 if len(lay) else 0
    finite = np.isfinite(x).all(axis=1)
    maxabs = np.where(finite, np.abs(np.nan_to_num(x)).max(axis=1), np.nan)
    status = kernel_status(maxabs, np.concatenate(layer_ids), cfg)
    y = normalize_block(np.where(status[:, None] == STATUS_OK, np.nan_to_num(x), 0.0), cfg.method)
    out = store.create_run_array(run_id, SHAPE, "normalized", y.shape, np.float32, chunk_kernels, ("kernel", "tap"))
    out[...] = y
    store.write_run_array(run_id, SHAPE, "status", status, chunk_kernels, ("kernel",))


# ----------------------------------------------------------------------------- measuring one call
def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class _Sampler(threading.Thread):
    """Peak RSS of the given processes (summed), sampled every ``dt`` seconds.

    The process list is taken once, before the call: scanning /proc for children on every sample
    would cost CPU (and the GIL) in the process that hosts the Dask scheduler, and skew its timing.
    """

    def __init__(self, procs: list, dt: float = 0.02):
        super().__init__(daemon=True)
        self.procs, self.dt, self.stop = procs, dt, threading.Event()
        self.peak = self.rss()

    def rss(self) -> int:
        import psutil

        total = 0
        for p in self.procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.dt)


def _cpu_s(procs: list) -> float:
    """User + system CPU seconds of the given processes, summed."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(fn) -> dict:
    """Wall time, peak RSS growth and CPU time of ``fn()`` in this process, and of its child processes."""
    import psutil

    proc = psutil.Process()
    workers = proc.children(recursive=True)  # LocalCluster's worker processes; none for the other variants
    exact = _reset_peak_rss()
    samplers = [_Sampler(workers)] + ([] if exact else [_Sampler([proc])])
    rss0, workers0 = proc.memory_info().rss, samplers[0].peak
    cpu0 = (_cpu_s([proc]), _cpu_s(workers))
    for s in samplers:
        s.start()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    cpu1 = (_cpu_s([proc]), _cpu_s(workers))
    for s in samplers:
        s.stop.set()
        s.join()
    peak = _maxrss_bytes() if exact else max(samplers[1].peak, rss0)
    return dict(wall_s=wall, rss0_mb=rss0 / 2**20, peak_growth_mb=max(0, peak - rss0) / 2**20,
                workers_growth_mb=max(0, samplers[0].peak - workers0) / 2**20, exact_peak=exact,
                cpu_main_s=cpu1[0] - cpu0[0], cpu_workers_s=cpu1[1] - cpu0[1])


def _prefix(key) -> str:
    """A Dask task's name without its token: ``('store-map-ab12', 3)`` -> ``store-map``."""
    name = key[0] if isinstance(key, tuple) else str(key)
    return name.rsplit("-", 1)[0]


def _top(d: dict, n: int = 6) -> dict:
    return dict(sorted(d.items(), key=lambda kv: -kv[1])[:n])


def child(args) -> None:
    """One variant, once, in this (fresh) process; prints one JSON line."""
    import dask

    from dwk.config import NormalizeConfig
    from dwk.normalize import normalize_shape
    from dwk.store import KernelStore

    store = KernelStore(args.store, create=False)
    ids = ckpt_ids(args.checkpoints)
    cfg = NormalizeConfig(method=args.method, chunk_kernels=args.chunk_kernels)
    run_id = args.child
    new_run(store, run_id, ids)
    setup, breakdown = 0.0, None
    if args.child == "numpy":
        res = measure(lambda: numpy_normalize(store, run_id, ids, cfg, args.chunk_kernels))
    elif args.child == "sync":
        import contextlib

        from dask.diagnostics import Profiler

        with dask.config.set(scheduler="synchronous"), (Profiler() if args.breakdown else contextlib.nullcontext()) as prof:
            res = measure(lambda: normalize_shape(store, run_id, SHAPE, ids, cfg, chunk_kernels=args.chunk_kernels))
        if args.breakdown:
            busy, n = {}, {}
            for r in prof.results:
                k = _prefix(r.key)
                busy[k] = busy.get(k, 0.0) + r.end_time - r.start_time
                n[k] = n.get(k, 0) + 1
            breakdown = dict(n_tasks=len(prof.results), task_s=sum(busy.values()), top=_top(busy), counts=n)
    else:
        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        # The arguments of dwk.pipeline.dask_client (without the dashboard).
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.wait_for_workers(2)
            setup = time.perf_counter() - t0
            import contextlib

            from distributed import get_task_stream

            with (get_task_stream(client) if args.breakdown else contextlib.nullcontext()) as stream:
                res = measure(lambda: normalize_shape(store, run_id, SHAPE, ids, cfg,
                                                      chunk_kernels=args.chunk_kernels, client=client))
            if args.breakdown:  # the scheduler's record of what the workers did
                busy, moved, n = {}, {}, {}
                for t in stream.data:
                    k = _prefix(t["key"])
                    n[k] = n.get(k, 0) + 1
                    for ss in t["startstops"]:
                        d = moved if ss["action"] == "transfer" else busy
                        d[k] = d.get(k, 0.0) + ss["stop"] - ss["start"]
                breakdown = dict(n_tasks=sum(n.values()), task_s=sum(busy.values()), transfer_s=sum(moved.values()),
                                 top=_top(busy), counts=n)
    res["setup_s"] = setup
    res["breakdown"] = breakdown
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- the parent
def run_child(args, variant: str, store: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--store", str(store), "--checkpoints", str(args.checkpoints),
           "--method", args.method, "--chunk-kernels", str(args.chunk_kernels)] + (["--breakdown"] if args.breakdown else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"variant {variant} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def compare(store_path: Path, variants: list[str], chunk: int) -> list[str]:
    """Chunk by chunk: every variant's normalised array and status vs the baseline's."""
    from dwk.store import KernelStore

    store = KernelStore(store_path, create=False)
    ref = variants[0]
    a_ref, s_ref = store.run_array(ref, SHAPE, "normalized"), store.run_array(ref, SHAPE, "status")[:]
    lines = []
    for v in variants[1:]:
        a, s = store.run_array(v, SHAPE, "normalized"), store.run_array(v, SHAPE, "status")[:]
        close = equal = a.shape == a_ref.shape
        max_diff = 0.0
        for i in range(0, a_ref.shape[0], chunk * 16):
            x, y = a_ref[i:i + chunk * 16], a[i:i + chunk * 16]
            close &= bool(np.allclose(x, y, rtol=1e-6, atol=1e-7))
            equal &= bool(np.array_equal(x, y))
            max_diff = max(max_diff, float(np.abs(x - y).max()))
        lines.append(f"  {v:12s} vs {ref}: status equal {bool(np.array_equal(s, s_ref))}, normalized allclose {close}, "
                     f"bitwise equal {equal}, max |diff| {max_diff:.2e}")
    counts = np.bincount(s_ref, minlength=3)
    lines.append(f"  status counts (ok, non-finite, dead): {tuple(int(c) for c in counts)}")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-kernels", type=int, default=500_000, help="7x7 kernels in the store (default 500,000 = 98 MB float32; 2,000,000 = 392 MB)")
    p.add_argument("--checkpoints", type=int, default=8, help="checkpoints the kernels are spread over")
    p.add_argument("--channels", type=int, default=1024, help="kernels per layer")
    p.add_argument("--store-chunk", type=int, default=16384, help="kernels per Zarr chunk of the checkpoints "
                   "(RunConfig.chunk_kernels default)")
    p.add_argument("--chunk-kernels", type=int, default=16384, help="kernels per Dask block / output chunk "
                   "(NormalizeConfig.chunk_kernels default)")
    p.add_argument("--method", default="l2", choices=["l2", "maxabs", "center_l2"])
    p.add_argument("--repeats", type=int, default=3, help="fresh-process repetitions per variant (median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--tmp-dir", default=None, help="where the temporary store goes (default: the system temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="also print where the Dask variants spend their time "
                   "(dask.diagnostics.Profiler / the distributed task stream; adds a little overhead)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := sorted(set(variants) - set(VARIANTS)):
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    tmp = Path(tempfile.mkdtemp(prefix="dwk-bench-normalize-", dir=args.tmp_dir))
    try:
        store = tmp / "store.zarr"
        t0 = time.perf_counter()
        build_store(store, args.n_kernels, args.checkpoints, args.channels, args.store_chunk, args.seed)
        on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        print(f"store: {args.n_kernels:,} 7x7 kernels = {args.n_kernels * 49 * 4 / 1e6:.0f} MB float32 over "
              f"{args.checkpoints} checkpoints ({on_disk / 1e6:.0f} MB on disk, Zarr chunks of {args.store_chunk}), "
              f"built in {time.perf_counter() - t0:.1f}s; output chunks of {args.chunk_kernels}; "
              f"{args.repeats} fresh processes per variant; {os.cpu_count()} CPUs")
        other = OtherLoad()
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.repeats):  # interleaved, so drift hits every variant alike
            for v in variants:
                results[v].append(run_child(args, v, store))
                print(f"  rep {r + 1} {v:12s} {results[v][-1]['wall_s']:7.2f}s  "
                      f"peak +{results[v][-1]['peak_growth_mb']:.0f} MB", flush=True)

        keys = ("wall_s", "peak_growth_mb", "workers_growth_mb", "setup_s", "cpu_main_s", "cpu_workers_s")
        med = {v: {k: statistics.median(x[k] for x in rs) for k in keys} for v, rs in results.items()}
        base = med[variants[0]]
        exact = all(x["exact_peak"] for rs in results.values() for x in rs)
        print()
        print(f"median of {args.repeats}; ratios vs {variants[0]}; peak = main-process RSS growth during the call "
              f"({'getrusage after a peak reset' if exact else 'psutil sampling every 20 ms'})")
        hdr = (f"{'variant':36s} {'wall s':>8s} {'x base':>7s} {'peak MB':>8s} {'x base':>7s} {'CPU s':>7s} "
               f"{'workers MB':>10s} {'workers CPU s':>13s} {'setup s':>8s}")
        print(hdr)
        print("-" * len(hdr))
        for v in variants:
            m = med[v]
            dist = v == "distributed"
            print(f"{LABELS[v]:36s} {m['wall_s']:8.2f} {m['wall_s'] / base['wall_s']:7.2f} {m['peak_growth_mb']:8.0f} "
                  f"{m['peak_growth_mb'] / max(base['peak_growth_mb'], 1e-9):7.3f} {m['cpu_main_s']:7.1f} "
                  + (f"{m['workers_growth_mb']:10.0f} {m['cpu_workers_s']:13.1f} {m['setup_s']:8.2f}" if dist
                     else f"{'-':>10s} {'-':>13s} {'-':>8s}"))
        print("  CPU s: user+system seconds of the main process during the call (for LocalCluster: client and scheduler);\n"
              "  workers MB / CPU s: growth of the summed, sampled RSS and the CPU seconds of the worker processes;\n"
              "  setup s: LocalCluster start, not in wall s")
        print("  " + other.note())
        if args.breakdown:
            print()
            print("where the Dask variants spend their time (last repetition; task s = summed task run time)")
            for v in variants:
                b = results[v][-1].get("breakdown")
                if not b:
                    continue
                extra = f", transfers {b['transfer_s']:.1f}s" if "transfer_s" in b else ""
                print(f"  {v}: {b['n_tasks']} tasks, task s {b['task_s']:.1f}{extra}, wall {results[v][-1]['wall_s']:.1f}s")
                for k, t in b["top"].items():
                    print(f"    {k[:52]:52s} {b['counts'][k]:6d} tasks {t:7.2f}s")
        if len(variants) > 1:
            print()
            print("same result?")
            for line in compare(store, variants, args.chunk_kernels):
                print(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
