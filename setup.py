"""Build d2z_optim.

The pure-Python package always builds. ``triton_kernels/`` ships inside the wheel
as ``d2z_optim.triton_kernels``: a top-level ``triton_kernels`` module already
exists in the Triton project.

    pip install --no-build-isolation -e .     # development
    pip wheel --no-build-isolation .          # a wheel, against the installed torch
"""

from setuptools import setup

setup(
    packages=["d2z_optim", "d2z_optim.backends", "d2z_optim.triton_kernels"],
    package_dir={"d2z_optim.triton_kernels": "triton_kernels"},
)
