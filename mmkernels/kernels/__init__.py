"""Triton kernels and their launchers, one module per kernel family (and the CUDA extension's
launcher, ``token_pool_cuda``). Loaded on first use: ``import mmkernels`` imports no kernel module.
"""
