"""nsa_kernels: Triton kernels for Native Sparse Attention, each beside its PyTorch reference.

Importable without the server (nothing here imports nsa_serve).
"""

import os

# Every kernel here was tuned, tested and timed with Triton fusing multiply-adds, its default through
# 3.9; Triton 3.9 warns at each compile that 3.10 turns that default off, which would change the
# kernels' rounding and speed unseen. Keep fusion on unless the user has chosen (Triton reads the
# variable when it compiles, so setting it here holds whichever was imported first).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
