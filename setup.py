"""Packaging: python/fastbon is the package, kernels/ installs as fastbon.kernels."""

from setuptools import setup

setup(
    packages=["fastbon", "fastbon.ops", "fastbon.kernels", "fastbon.models"],
    package_dir={"fastbon": "python/fastbon", "fastbon.kernels": "kernels"},
    package_data={"fastbon.models": ["*/*.json", "*/*.safetensors", "*/*.txt"]},
)
