"""Build script: the Python package, plus the optional CUDA extension `mmkernels._C` (see csrc/)."""
from setuptools import setup

setup()
