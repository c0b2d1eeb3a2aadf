"""Build script. The package metadata lives in pyproject.toml; this file exists for the compiled
extension mmkd_kernels._C, which the native backend adds (csrc/)."""

from setuptools import setup

setup()
