"""What the benchmark scripts measure, measured one way: interleaved medians and peak memory.

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from benchmarks.timing import interleaved_medians
"""

import ctypes
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm


def interleaved_medians(
    runs: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, desc: str | None = None
) -> dict[str, float]:
    """Median seconds of each ``run()`` over ``repeats`` rounds that run every one in turn.

    Interleaving makes a change in machine load (other processes) hit every run alike. Each
    ``run`` must return only when its work is done (``jax.block_until_ready``). ``warmup``
    untimed rounds first (compilation, caches); ``desc`` shows a progress bar.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds = {name: [] for name in runs}
    for _ in tqdm(range(repeats), desc=desc, unit="round", disable=desc is None):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(run: Callable[[], Any]) -> float:
    """How far this process's resident memory rises above its current level during ``run()``
    (MiB; Linux).

    Memory freed before the call is first handed back to the OS (``malloc_trim``) and the
    high-water mark reset, so that only what ``run`` needs counts. The measurement can only
    err low (freed memory still resident gets reused): take the largest of a few processes.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline = _status_mib("VmRSS")
    result = run()
    peak = _status_mib("VmHWM") - baseline
    del result  # alive until here: what run returns counts in the peak
    return peak


def print_peak(mib: float) -> None:
    """For a child process measured by :func:`max_peak_in_subprocesses`: its last line."""
    print(json.dumps({"peak_mib": mib}))


def max_peak_in_subprocesses(command: list[str], repeats: int) -> float:
    """Largest peak over ``repeats`` fresh runs of ``command``, each of which reports its peak
    with :func:`print_peak`. Fresh processes: nothing allocated before blurs the figure."""
    peaks = []
    for _ in range(repeats):
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        peaks.append(json.loads(child.stdout.strip().splitlines()[-1])["peak_mib"])
    return max(peaks)
