"""Build glue for the one C extension; all metadata lives in setup.cfg."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "noodle._shm",
            sources=["noodle/_shm.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"],
        )
    ]
)
