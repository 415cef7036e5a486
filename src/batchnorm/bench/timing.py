"""Timing on either device, the copy that sets the roofline's bandwidth, and the machine's
description for the header and the JSON."""

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def round_ms(fn: Callable[[], object], device_type: str, repeat: int) -> list[float]:
    """One round of timings in milliseconds. CPU: `repeat` calls on the wall clock. CUDA:
    triton.testing.do_bench's calls over 100 ms (synchronized, L2 flushed between calls)."""
    if device_type == "cuda":
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=25, rep=100, return_mode="all"))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_ms(fns: Mapping[str, Callable[[], object]], device_type: str, repeat: int,
                   rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Every callable timed round by round, interleaved, in the reverse order every other round
    (whoever runs first after another row's work, or right after another provider, meets caches
    and allocator state that the next one does not: a fixed order favoured the later provider
    by 3-9% on identical kernels); the median of all timings, and the spread: (slowest -
    fastest round median) / median of the round medians."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    round_medians: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for number in range(rounds):
        for name, fn in (order if number % 2 == 0 else order[::-1]):
            this_round = round_ms(fn, device_type, repeat)
            times[name] += this_round
            round_medians[name].append(statistics.median(this_round))
    ms = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: (max(r) - min(r)) / statistics.median(r) for name, r in round_medians.items()}
    return ms, spread


def copy_of(x: torch.Tensor) -> Callable[[], object]:
    """A plain copy of x into a preallocated tensor of its layout (`out.copy_(x)`): timed with
    the providers, round by round, it is the bandwidth a case's time is set against."""
    out = torch.empty_like(x.detach())
    source = x.detach()
    return lambda: out.copy_(source)


def allow_recompiles() -> None:
    """Every shape x layout x mode compiles anew; past dynamo's default limit (8 recompiles)
    torch.compile silently runs eager, and the 'compile' column would be torch's."""
    import torch._dynamo

    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                  "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 100_000)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def load() -> str:
    return _read("/proc/loadavg")


def machine(device_type: str) -> dict:
    from batchnorm.kernels import cpu

    info = {
        "device": device_type,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_kernels": cpu.compiled_capability() or "not built",
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "loadavg_start": load(),
    }
    if device_type == "cuda":
        import triton

        info["triton"] = triton.__version__
        if torch.cuda.is_available():  # not in the CPU dry run
            info["gpu"] = torch.cuda.get_device_properties(0).name
            info["cuda"] = torch.version.cuda
    return info


def header(info: dict) -> str:
    line = (f"torch {info['torch']}, CPU kernels {info['cpu_kernels']}, "
            f"THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE']}, "
            f"THP {info['transparent_hugepage']}, load {info['loadavg_start']}")
    if info["device"] == "cuda":
        line = f"{info.get('gpu', 'CPU dry run')}, triton {info['triton']}, " + line
    return line
