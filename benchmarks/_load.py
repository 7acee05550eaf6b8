"""Shared by the benchmarks: how much other processes used the CPUs while one ran."""
import os
import time


class OtherLoad:
    """CPU time used outside this benchmark while it runs: timings taken while other processes compete
    for the CPUs are unreliable, so the report says so. System-wide busy CPU time (psutil.cpu_times)
    minus this process's and its waited-for descendants' (resource.getrusage)."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))

    @staticmethod
    def _own() -> float:
        import resource

        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    def note(self) -> str:
        wall = time.perf_counter() - self.t0
        used = max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0))
        cores = used / max(wall, 1e-9)
        warn = " -- WARNING: other processes competed for the CPUs, timings are unreliable" \
            if cores > 0.1 * (os.cpu_count() or 1) else ""
        return f"other processes used {used:.1f} CPU-s during the {wall:.0f}s benchmark (avg {cores:.2f} cores){warn}"
