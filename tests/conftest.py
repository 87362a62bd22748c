"""Test setup: without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1), which
must be set before triton is first imported — so it is set here, at collection time."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
