"""Triton kernels of d2z_optim, installed as ``d2z_optim.triton_kernels``.

(A top-level package named ``triton_kernels`` already exists in the Triton
project, so setup.py maps this folder under the package's own namespace.)
Triton is imported lazily by each kernel module: a CPU install never needs it.
"""
