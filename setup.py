"""Builds the Cython core; everything else is in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "vmied._fastio",
        ["vmied/_fastio.pyx"],
        extra_compile_args=["-O3"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}, quiet=True)
      if not os.environ.get("VMIED_NO_EXTENSIONS") else [])
