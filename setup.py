"""Builds the native CPU kernels (batchnorm.kernels.cpu._C) as a torch C++ extension.

Metadata lives in pyproject.toml; this file only adds the extension, and only where torch is
installed already (pip install --no-build-isolation: scripts/env.sh installs torch first). An
ordinary install (build isolation: no torch here) installs pure Python with the C++ sources, and
the package compiles them on first use against the torch it finds then (kernels/cpu/build.py).
Where the compiler fails here the package installs without the extension and does the same.

Sources and flags come from kernels/cpu/compile_flags.py, which the first-use build uses too;
this file loads it by path, since the package cannot be imported while it is being built. Next
to the extension goes _C.json: the torch, sources and instruction set it was built for, so that
the package can tell an extension built for another torch from one it can load.
"""

import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(
    "compile_flags", ROOT / "src" / "batchnorm" / "kernels" / "cpu" / "compile_flags.py")
assert _spec is not None and _spec.loader is not None
compile_flags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compile_flags)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # no torch at build time (an isolated build): pure Python
        return [], {}
    try:
        capability = compile_flags.capability()
    except ValueError as wrong:
        raise SystemExit(str(wrong)) from None

    class BuildWithStamp(BuildExtension):
        def build_extension(self, ext):
            super().build_extension(ext)
            self._stamp(ext).write_text(json.dumps({
                "torch": torch.__version__, "capability": capability,
                "sources": compile_flags.source_hash()}))

        def copy_extensions_to_source(self):  # an editable install: the stamp goes along
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                built = Path(self.build_lib, self.get_ext_filename(ext.name)).with_name("_C.json")
                package_dir = build_py.get_package_dir(ext.name.rpartition(".")[0])
                if built.exists():
                    self.copy_file(str(built), os.path.join(package_dir, built.name))

        def _stamp(self, ext) -> Path:  # in the build directory (inplace is off while building)
            return Path(self.get_ext_fullpath(ext.name)).with_name("_C.json")

    sources = [os.path.relpath(path, ROOT) for path in compile_flags.sources()]
    extension = CppExtension("batchnorm.kernels.cpu._C", sources,
                             extra_compile_args={"cxx": compile_flags.compile_args(capability)},
                             extra_link_args=compile_flags.link_args(), optional=True)
    return [extension], {"build_ext": BuildWithStamp}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
