"""Compile the attention kernels for a CUDA target without a GPU (ptxas ships with triton).

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter replaces
``@triton.jit`` functions); prints one line per kernel and exits 1 on any failure.
Usage: python tests/aot_compile.py ARCH DTYPE HEAD_DIM [HEAD_DIM ...]
"""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmkernels.kernels import attention as A

POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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


def compile_one(label: str, fn, dtype: str, consts: dict, cfg, target, pointers=POINTERS) -> bool:
    """Compile one specialisation; print ok or the error (its tail: where triton names the cause)."""
    try:
        triton.compile(ASTSource(fn, signature(fn, dtype, consts, pointers), consts), target=target,
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        print(f"{label}: ok")
        return True
    except Exception as exc:  # report every kernel, then fail
        print(f"{label}: FAILED {str(exc)[-3000:]}")
        return False


def main() -> int:
    from mmkernels.kernels import qformer as Q

    arch, dtype, dims = int(sys.argv[1]), sys.argv[2], [int(x) for x in sys.argv[3:]]
    target = GPUTarget("cuda", arch, 32)
    ok = True
    for d in dims:
        d0, d1 = A.split_head_dim(d)
        for name, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
            cfg = A._gpu_configs(name, d, TORCH_DTYPES[dtype])[0]
            consts = dict(HEAD_DIM=d, D0=d0, D1=d1, MASK_KIND=1, IS_CAUSAL=True, HAS_DROPOUT=True,
                          PREC="tf32", UPCAST=False, **cfg.kwargs)
            ok &= compile_one(f"sm_{arch} {dtype} d={d} {name}", fn, dtype, consts, cfg, target)
    # the fused Q-Former forward at BLIP-2's shape (d = 64)
    cfg = Q._configs(TORCH_DTYPES[dtype])[0]
    consts = dict(HEAD_DIM=64, BLOCK_D=64, MASK_KIND=2, HAS_DROPOUT=True, PREC="tf32", UPCAST=False,
                  BLOCK_M=32, **cfg.kwargs)
    ok &= compile_one(f"sm_{arch} {dtype} qformer fwd", Q._qformer_fwd, dtype, consts, cfg, target, QFORMER_POINTERS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
