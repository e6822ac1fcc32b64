"""Compile the attention kernels for a CUDA target without a GPU (ptxas ships with triton).

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter replaces
``@triton.jit`` functions); prints one line per kernel and exits 1 on any failure.
Usage: python tests/aot_compile.py ARCH DTYPE HEAD_DIM [HEAD_DIM ...]
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmkernels.kernels import attention as A

POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
QFORMER_POINTERS = {"X", "E", "WQ", "BQ", "WK", "BK", "WV", "BV", "O"}


def signature(fn, dtype: str, consts: dict, pointers=POINTERS) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = f"*{dtype}"
        elif name in ("LSE", "DELTA", "STATS"):
            sig[name] = "*fp32"
        elif name == "MASK":
            sig[name] = "*u8"
        elif name == "SEED":
            sig[name] = "*i64"
        elif name in ("qk_scale", "sm_scale", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main() -> int:
    arch, dtype, dims = int(sys.argv[1]), sys.argv[2], [int(x) for x in sys.argv[3:]]
    target = GPUTarget("cuda", arch, 32)
    failed = 0
    for d in dims:
        d0, d1 = A.split_head_dim(d)
        for name, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
            cfg = A._gpu_configs(name, d, {"bf16": __import__("torch").bfloat16,
                                            "fp16": __import__("torch").float16,
                                            "fp32": __import__("torch").float32}[dtype])[0]
            consts = dict(HEAD_DIM=d, D0=d0, D1=d1, MASK_KIND=1, IS_CAUSAL=True, HAS_DROPOUT=True,
                          PREC="tf32", UPCAST=False, **cfg.kwargs)
            try:
                triton.compile(ASTSource(fn, signature(fn, dtype, consts), consts), target=target,
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                print(f"sm_{arch} {dtype} d={d} {name}: ok")
            except Exception as exc:  # report every kernel, then fail
                failed += 1
                print(f"sm_{arch} {dtype} d={d} {name}: FAILED {exc!r}"[:4000])
    # the fused Q-Former forward at BLIP-2's shape (d = 64)
    import torch

    from mmkernels.kernels import qformer as Q

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = Q._configs(tdtype)[0]
    consts = dict(HEAD_DIM=64, BLOCK_D=64, MASK_KIND=2, HAS_DROPOUT=True, PREC="tf32", UPCAST=False,
                  BLOCK_M=32, **cfg.kwargs)
    try:
        triton.compile(ASTSource(Q._qformer_fwd, signature(Q._qformer_fwd, dtype, consts, QFORMER_POINTERS), consts), target=target,
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        print(f"sm_{arch} {dtype} qformer fwd: ok")
    except Exception as exc:
        failed += 1
        print(f"sm_{arch} {dtype} qformer fwd: FAILED {str(exc)[-3000:]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
