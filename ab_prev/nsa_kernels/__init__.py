"""nsa_kernels: Triton kernels for Native Sparse Attention, each beside its PyTorch reference.

Importable without the server (nothing here imports nsa_serve).
"""
