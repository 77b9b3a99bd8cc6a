import os

import torch

# Triton kernels only run on the CPU through its interpreter, which must be switched on before any
# @triton.jit decorator runs (i.e. before ms_fused.triton_backend is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
