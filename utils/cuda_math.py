"""How CUDA does fp32 arithmetic: as the authors trained, or faster."""
from __future__ import annotations

import torch

CUDA_MATH = ("strict", "fast")


def set_cuda_math(mode: str) -> None:
    """Process-wide; no effect on the CPU.

    strict: true fp32 convolutions and matrix products (no TF32) and deterministic cuDNN
        algorithms. The authors trained so: their script set cudnn.deterministic, and their
        GPUs predate TF32 (docs/authors_behaviour.md, section 1).
    fast: TF32 tensor cores for fp32 convolutions and matrix products (inputs rounded to 10
        mantissa bits, about 1e-3 relative error) and any cuDNN algorithm, deterministic or not.
    """
    if mode not in CUDA_MATH:
        raise ValueError(f"cuda math must be one of {CUDA_MATH}, got {mode!r}")
    strict = mode == "strict"
    # The boolean flags, not torch's newer fp32_precision strings: torch refuses to report
    # the flags once both interfaces have set them, and the tests read the booleans.
    torch.backends.cudnn.allow_tf32 = not strict
    torch.backends.cuda.matmul.allow_tf32 = not strict
    torch.backends.cudnn.deterministic = strict
