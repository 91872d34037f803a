"""Timing helpers shared by the benchmarks: compile once, then interleaved medians.

Rounds interleave the timed calls, so that on a shared machine every variant sees the
same load; medians and the interquartile range are reported, with process CPU time beside
wall time (CPU time is the steadier measure of work when other processes compete).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import equinox as eqx
import jax


def write_result(result: dict, path: str, *, indent: int = 2) -> None:
    """``result`` as JSON at ``path`` (its folder made if missing), and a line saying so."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=indent)
    print(f"\nwrote {path}")


def compile_call(fn, *args):
    """Lower and compile ``eqx.filter_jit(fn)``; returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = eqx.filter_jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def timed(fn, *args) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call of ``fn(*args)``, waiting for its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def summarise(walls: list[float], cpus: list[float]) -> dict:
    """Median, IQR and minimum of wall times (ms) and the median CPU time (ms)."""
    q = statistics.quantiles(walls, n=4) if len(walls) > 1 else [walls[0]] * 3
    return {
        "wall_ms": 1e3 * statistics.median(walls),
        "wall_ms_iqr": [1e3 * q[0], 1e3 * q[2]],
        "wall_ms_min": 1e3 * min(walls),
        "cpu_ms": 1e3 * statistics.median(cpus),
        "rounds": len(walls),
    }


def run_interleaved(calls: dict, repeats: int | dict, warmup: int = 2, settle_below_s: float = 1.0) -> dict:
    """``calls``: name -> zero-argument callable returning (wall, cpu) seconds.

    ``repeats`` is one count for all or a per-name dict (expensive calls get fewer rounds;
    a call drops out of later rounds once it has its count). Returns name -> summary.

    Rounds interleave the calls so that a slow spell of the machine falls on all of them. A call
    whose warm-up took less than ``settle_below_s`` runs once more, untimed, right before each
    timed run: the first run of a cheap step after an expensive one (a path-gradient step, a
    sampling chunk) finds the caches and the allocator's memory left by that one and can take
    twice as long, which a training loop of back-to-back steps never sees.
    """
    counts = {name: repeats[name] if isinstance(repeats, dict) else repeats for name in calls}
    cheap = {}
    for name, fn in calls.items():
        wall = None
        for _ in range(warmup):
            wall, _ = fn()
        cheap[name] = wall is not None and wall < settle_below_s
    samples = {name: ([], []) for name in calls}
    for r in range(max(counts.values())):
        for name, fn in calls.items():
            if r < counts[name]:
                if cheap[name]:
                    fn()
                wall, cpu = fn()
                samples[name][0].append(wall)
                samples[name][1].append(cpu)
    return {name: summarise(walls, cpus) for name, (walls, cpus) in samples.items()}


def machine() -> dict:
    """What the numbers were measured on (device, cores, software, load)."""
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}".rstrip(":"),
        "n_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "load_average_1min": os.getloadavg()[0],
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
