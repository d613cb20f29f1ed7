"""Packaging: python/fastbon is the package, kernels/ installs as fastbon.kernels."""

from setuptools import setup

setup(
    packages=["fastbon", "fastbon.ops", "fastbon.kernels"],
    package_dir={"fastbon": "python/fastbon", "fastbon.kernels": "kernels"},
)
