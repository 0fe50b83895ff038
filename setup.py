"""Builds the loader's native hot loop (plain C, loaded with ctypes; see daemon/hotweightsd/loaders/hwfill.c).

Optional: without a C compiler the package installs anyway and the loader runs its Python workers
(the load's description says which engine ran).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hotweightsd.loaders._hwfill",
            sources=["daemon/hotweightsd/loaders/hwfill.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            libraries=["dl", "pthread"],
            optional=True,
        )
    ]
)
