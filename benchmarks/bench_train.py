"""Autoencoder training throughput (kernels per second per epoch) vs batch size, on CPU and CUDA.

``dwk.autoencoder.train`` (the trainer the pipeline runs, unchanged: Adam, cosine decay, one
one ``.item()`` per epoch) is timed on N normalised 7x7 planted kernels for batch sizes 256, 1024
and 4096, on the CPU and, when ``torch.cuda.is_available()``, on the GPU. The end of each epoch is
timestamped through the trainer's ``on_epoch`` callback; the first epoch (model set-up, first
allocations, cuBLAS start-up) is a warm-up and is dropped, and the median over the remaining epochs
(of all repetitions) is reported as kernels/second, with its ratio to the baseline measured in the
same run: batch 256 on the CPU. Why: the config's default batch is 4096 while the paper-style small
batches cost many more optimiser steps per epoch; this shows what a batch size costs per epoch on
each device. The cosine loss after the last epoch is printed beside it, because a larger batch also
means fewer steps for the same number of epochs, so throughput is not the whole story.

Run: ``.venv/bin/python benchmarks/bench_train.py`` (``--help`` for sizes; about 30 s on 2 cores).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
from _load import OtherLoad  # benchmarks/ is the script's folder, so on sys.path


def make_data(n: int, seed: int) -> np.ndarray:
    """``n`` l2-normalised planted 7x7 kernels, flattened (n, 49) float32 (content does not change speed)."""
    from dwk.normalize import normalize_block
    from dwk.planted import planted_population

    k, _ = planted_population(n, (7, 7), noise_share=0.1, seed=seed)
    return normalize_block(k.reshape(n, -1), "l2")


def time_training(x: np.ndarray, device: str, batch: int, epochs: int, repeats: int) -> dict:
    import torch

    from dwk import autoencoder as ae
    from dwk.config import AutoencoderConfig

    cfg = AutoencoderConfig(epochs=epochs, batch_size=batch, device=device, log_every=10**9)
    per_epoch, losses = [], []
    for _ in range(repeats):
        stamps: list[float] = []
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # on_epoch runs after the epoch's loss.item(), which waits for the device: the stamps are exact.
        _, loss = ae.train(x, cfg, on_epoch=lambda epoch, l: stamps.append(time.perf_counter()))
        durations = np.diff([t0, *stamps])
        per_epoch.extend(durations[1:].tolist())  # epoch 0 is the warm-up
        losses.append(loss[-1])
    s = statistics.median(per_epoch)
    return dict(device=device, batch=batch, steps=math.ceil(len(x) / min(batch, len(x))), s_per_epoch=s,
                kps=len(x) / s, spread=(len(x) / max(per_epoch), len(x) / min(per_epoch)), loss=statistics.median(losses))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-kernels", type=int, default=65536, help="training kernels (default 65536)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per training run; the first is dropped as warm-up")
    p.add_argument("--repeats", type=int, default=2, help="training runs per configuration (epochs pooled)")
    p.add_argument("--batch-sizes", default="256,1024,4096")
    p.add_argument("--devices", default="auto", help="'auto' (cpu, plus cuda when available), or e.g. 'cpu' or 'cuda'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first epoch is a warm-up)")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.devices == "auto" else [d.strip() for d in args.devices.split(",")]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.devices != "auto":
            p.error("--devices names cuda but torch.cuda.is_available() is False")
        devices.remove("cuda")
    if args.devices == "auto" and not torch.cuda.is_available():
        devices = ["cpu"]
    batches = [int(b) for b in args.batch_sizes.split(",")]

    other = OtherLoad()
    t0 = time.perf_counter()
    x = make_data(args.n_kernels, args.seed)
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if "cuda" in devices else ", no CUDA GPU"
    print(f"{len(x):,} 7x7 kernels (made in {time.perf_counter() - t0:.1f}s); {args.epochs} epochs x {args.repeats} "
          f"run(s) per configuration, first epoch dropped; torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads, {os.cpu_count()} CPUs{gpu}")
    rows = []
    for dev in devices:
        for b in batches:
            r = time_training(x, dev, b, args.epochs, args.repeats)
            rows.append(r)
            print(f"  {dev:4s} batch {b:5d}: {r['kps']:12,.0f} kernels/s", flush=True)

    base = rows[0]
    print()
    print(f"median kernels/s per epoch; ratio vs {base['device']} batch {base['batch']}; "
          f"range = slowest..fastest timed epoch")
    hdr = f"{'device':6s} {'batch':>6s} {'steps/epoch':>11s} {'s/epoch':>8s} {'kernels/s':>11s} {'x base':>7s} " \
          f"{'range kernels/s':>21s} {'loss@end':>9s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        rng = f"{r['spread'][0]:,.0f}..{r['spread'][1]:,.0f}"
        print(f"{r['device']:6s} {r['batch']:6d} {r['steps']:11d} {r['s_per_epoch']:8.3f} {r['kps']:11,.0f} "
              f"{r['kps'] / base['kps']:7.2f} {rng:>21s} {r['loss']:9.4f}")
    print("  loss@end: cosine loss of the last epoch (median over runs); fewer steps per epoch at larger batches "
          "means less training per epoch")
    print("  " + other.note())


if __name__ == "__main__":
    main()
