"""Builds the native CPU kernels (batchnorm.kernels.cpu._C) as a torch C++ extension.

Metadata lives in pyproject.toml; this file only adds the extension. It is built against the
torch already installed (pip install --no-build-isolation: scripts/env.sh installs torch first);
where torch or a C++ compiler is missing the package installs without it, and batchnorm runs on
its torch-operations fallback and says so once.

The kernels are compiled for the best instruction set of the machine that builds them
(AVX512, AVX2 or none, the three of ATen's vector types this needs), which is the machine that
runs them: an editable install builds in place. BATCHNORM_CPU_CAPABILITY=AVX2 / DEFAULT builds
for less. At run time the extension checks the processor before it registers anything.
"""

import os

from setuptools import setup

SOURCES = ["src/batchnorm/kernels/cpu/ops.cpp", "src/batchnorm/kernels/cpu/kernels.cpp",
           "src/batchnorm/kernels/cpu/autograd.cpp"]
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
CAPABILITY_NEEDS = {
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
    "AVX2": {"avx2", "fma", "f16c"},
    "DEFAULT": set(),
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _capability() -> str:
    forced = os.environ.get("BATCHNORM_CPU_CAPABILITY")
    if forced:
        if forced not in CAPABILITY_FLAGS:
            raise SystemExit(f"BATCHNORM_CPU_CAPABILITY must be one of {sorted(CAPABILITY_FLAGS)}, "
                             f"got {forced!r}")
        return forced
    flags = _cpu_flags()
    return next(name for name, needs in CAPABILITY_NEEDS.items() if needs <= flags)


def _extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # no torch at build time (an isolated build): pure Python
        return [], {}
    capability = _capability()
    flags = ["-O3", "-g0", "-fvisibility=hidden", "-Wno-maybe-uninitialized", f"-DCPU_CAPABILITY={capability}"]
    if capability != "DEFAULT":
        flags.append(f"-DCPU_CAPABILITY_{capability}")
    flags += CAPABILITY_FLAGS[capability]
    # -fopenmp makes at::parallel_for parallel (without it the header runs it serially); the
    # OpenMP runtime is torch's own: libgomp.so.1, which torch has loaded before us.
    extension = CppExtension("batchnorm.kernels.cpu._C", SOURCES,
                             extra_compile_args={"cxx": [*flags, "-fopenmp"]},
                             extra_link_args=["-fopenmp"], optional=True)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
