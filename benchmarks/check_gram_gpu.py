"""GPU: the 16-bit Hessian update (``add_gram``, fp32 output) against X in fp32 with TF32 off.

Both sum exact products in fp32, so they differ only by summation order. Usage (device):
  python benchmarks/check_gram_gpu.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from requant.quantization.hessians import _MM_OUT_DTYPE, add_gram

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16384, 14336, device="cuda", generator=g).to(torch.bfloat16)
    fast, exact = (torch.zeros(14336, 14336, device="cuda") for _ in range(2))
    out = {}
    for name, run in [("16-bit, fp32 out", lambda: add_gram(fast, x)),
                      ("fp32, TF32 off", lambda: exact.addmm_(x.float().t(), x.float()))]:
        run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        out[name + " ms"] = round((time.perf_counter() - t0) / 5 * 1000, 1)
    out["rel_diff"] = float((fast - exact).norm() / exact.norm())
    out["out_dtype_used"] = _MM_OUT_DTYPE.get("ok")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
