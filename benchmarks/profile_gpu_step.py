"""Where one autoencoder training step goes on a CUDA GPU (needs one; exits with a message otherwise).

Prints the wall time per step of the trainer's step (gather a batch, cosine loss, backward, fused
Adam) at batch 256, eager and under ``torch.compile`` (default and ``reduce-overhead``, i.e. CUDA
graphs for forward and backward), each measured after its own warm-up in the same process; then a
``torch.profiler`` table of 50 eager steps (host time per op against GPU time). The baseline is the
eager step. benchmarks/README.md, "Where a GPU step goes", reports its numbers from an H100.

Run: ``python benchmarks/profile_gpu_step.py`` on a machine with a GPU (about 1 minute).
"""
from __future__ import annotations

import sys
import time


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("profile_gpu_step.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    from torch.profiler import ProfilerActivity, profile

    from dwk import autoencoder as ae
    from dwk.normalize import normalize_block
    from dwk.planted import planted_population

    k, _ = planted_population(65536, (7, 7), seed=0)
    dev = torch.device("cuda")
    data = torch.as_tensor(normalize_block(k.reshape(len(k), -1), "l2"), device=dev)
    perm = torch.randperm(len(data)).to(dev)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; batch 256, 7x7 kernels")

    def make_step(mode):
        model = ae.KernelAutoencoder(49).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

        def loss_of(b):
            return ae.cosine_loss(b, model(b))

        loss_fn = torch.compile(loss_of, mode=mode, dynamic=False) if mode else loss_of

        def step(i):
            b = data[perm[i * 256:(i + 1) * 256]]
            loss = loss_fn(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    base = None
    for mode in (None, "default", "reduce-overhead"):
        step = make_step(mode)
        t0 = time.perf_counter()
        for i in range(20):  # warm-up, compilation included
            step(i)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(300):
            step(i % 250)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 300 * 1e3
        base = base or ms
        print(f"  {mode or 'eager':16s} {ms:6.2f} ms/step  ({ms / base:.2f}x eager; warm-up and compile {warm:.1f} s)",
              flush=True)

    step = make_step(None)
    for i in range(20):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(50):
            step(i)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
