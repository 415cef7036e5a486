"""How the native CPU kernels are compiled: the sources, the instruction set, the flags.

One place for both builds: setup.py (at install time, when torch is there) loads this file by
path, since it cannot import the package it is building, and build.py (the first-use build into a
per-user cache) imports it. Standard library only, for the same reason.

The kernels are compiled for the best instruction set of the machine that builds them (AVX512,
AVX2 or none, the three of ATen's vector types they need), which is the machine that runs them.
BATCHNORM_CPU_CAPABILITY=AVX2 / DEFAULT builds for less. At run time the extension checks the
processor before it registers anything.
"""

import hashlib
import os
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
CAPABILITY_NEEDS = {  # the /proc/cpuinfo flags each one needs, best first
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
    "AVX2": {"avx2", "fma", "f16c"},
    "DEFAULT": set(),
}


def sources() -> list[Path]:
    """Every C++ source of the extension: all the .cpp files beside this one."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def source_hash() -> str:
    """A hash of what the extension is built from: its sources, headers and this file."""
    digest = hashlib.sha256()
    for path in [*sources(), *sorted(SOURCE_DIR.glob("*.h")), Path(__file__).resolve()]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def capability() -> str:
    """The instruction set to compile for: BATCHNORM_CPU_CAPABILITY if set, else the best this
    processor has."""
    forced = os.environ.get("BATCHNORM_CPU_CAPABILITY")
    if forced:
        if forced not in CAPABILITY_FLAGS:
            raise ValueError(f"BATCHNORM_CPU_CAPABILITY must be one of "
                             f"{sorted(CAPABILITY_FLAGS)}, got {forced!r}")
        return forced
    flags = _cpu_flags()
    return next(name for name, needs in CAPABILITY_NEEDS.items() if needs <= flags)


def compile_args(capability: str) -> list[str]:
    """The compiler flags beyond torch's own (which torch.utils.cpp_extension adds)."""
    flags = ["-O3", "-g0", "-fvisibility=hidden", "-Wno-maybe-uninitialized",
             f"-DCPU_CAPABILITY={capability}"]
    if capability != "DEFAULT":
        flags.append(f"-DCPU_CAPABILITY_{capability}")
    # -fopenmp makes at::parallel_for parallel (without it the header runs it serially); the
    # OpenMP runtime is torch's own: libgomp.so.1, which torch has loaded before us.
    return [*flags, *CAPABILITY_FLAGS[capability], "-fopenmp"]


def link_args() -> list[str]:
    return ["-fopenmp"]
