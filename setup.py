"""Packaging: maps the top-level ``kernels/`` folder to ``spark_ext.kernels``.

The compiled C++/CUDA library is handled in ``spark_ext/_extension.py``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["spark_ext", "spark_ext.*"]) + ["spark_ext.kernels"]

setup(
    packages=packages,
    package_dir={"spark_ext.kernels": "kernels"},
)
