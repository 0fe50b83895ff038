"""Builds the loader's native hot loop (plain C, loaded with ctypes; see daemon/hotweightsd/loaders/hwfill.c).

Where a C compiler exists the library must build: a compile error fails the install, so a broken
build never goes unnoticed as a silent fallback. Where no C compiler exists at all, the package
installs without it, says so, and the loader runs its python workers (each load's description says
which engine ran and why).
"""

import os
import shlex
import shutil
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def c_compiler() -> str | None:
    """The compiler distutils would call (``CC``, else the one Python was built with), if it is installed."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shutil.which(shlex.split(cc)[0])


class BuildNative(build_ext):
    def run(self) -> None:
        if self.extensions and c_compiler() is None:
            print(
                "WARNING: hotweights: no C compiler found; installing without the native loader "
                "(loads run on the python workers, slower with several GPUs). Install a C compiler "
                "(e.g. gcc) and reinstall to build it.",
                file=sys.stderr,
            )
            self.extensions = []
        super().run()


setup(
    cmdclass={"build_ext": BuildNative},
    ext_modules=[
        Extension(
            "hotweightsd.loaders._hwfill",
            sources=["daemon/hotweightsd/loaders/hwfill.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            libraries=["dl", "pthread"],
        )
    ],
)
