"""The memory bandwidth of this machine, probed: what the `host` target profile decodes with.

The probe reads a buffer much larger than the last-level cache with as many threads
as llama.cpp would use (numpy's reductions release the GIL, so the threads really
run in parallel) and reports bytes read per second: what decoding needs, since a
decoded token reads every weight once. Best of a few rounds, as machines are noisy.

    print(read_bandwidth_gbps(default_threads()))
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from packager.host import default_threads

PROBE_BYTES = 512 << 20  # far beyond any L3 (tens of MB)
ROUNDS = 5
# What llama.cpp's CPU decode makes of the probed bandwidth: fitted (least relative squares) on this
# project's 2-vCPU Zen 4 host to the ctx-512 rows of benchmarks/plan_calibration.py (SmolLM2-135M and
# Qwen2.5-0.5B/1.5B-config models at Q8_0 and Q4_K_M; 2026-11-29 19:48 UTC, probe 30.2 GB/s) and checked
# on its other rows: decode streams the weights at 88% of the probed read bandwidth, and pays a fixed
# ~157 us per layer per token (thread barriers and graph launch: half of a 135M model's token).
DECODE_FRACTION = 0.88
LAYER_OVERHEAD_US = 157.0


def read_bandwidth_gbps(n_threads: int, size: int = PROBE_BYTES, rounds: int = ROUNDS) -> float:
    """GB/s that ``n_threads`` threads read from RAM (each reduces its own slice of a shared buffer)."""
    import numpy as np

    buf = np.ones(size // 4, dtype=np.float32)  # written once, so every page is resident
    slices = np.array_split(buf, n_threads)
    # A max-reduction is vectorized and does almost no arithmetic per byte: it is bound by reads
    # (a sum or a bitwise reduce measured 30-50% lower on x86, compute-bound; memcpy also writes).
    best = 0.0
    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(np.maximum.reduce, slices))  # warm up the threads and the TLB
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(pool.map(np.maximum.reduce, slices))
            best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


if __name__ == "__main__":  # python -m packager.plan.host_probe
    n = default_threads()
    print(f"{n} threads: {read_bandwidth_gbps(n):.2f} GB/s read; 1 thread: {read_bandwidth_gbps(1):.2f} GB/s")

