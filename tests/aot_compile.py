"""Compile the Triton kernels for a CUDA target without a GPU (ptxas ships with triton).

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter replaces
``@triton.jit`` functions); prints one line per kernel and exits 1 on any failure.
Usage: python tests/aot_compile.py ARCH DTYPE HEAD_DIM [HEAD_DIM ...]   (attention + Q-Former)
       python tests/aot_compile.py ARCH DTYPE token_pool                (token pooling)
"""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# argument types that are not the kernel's data dtype ("x") nor i32 (the default)
ATTENTION_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "STATS": "*fp32", "MASK": "*u8", "SEED": "*i64", "DS": "*fp32",
                   "COS": "*fp32", "SIN": "*fp32", "CU_Q": "*i32", "CU_K": "*i32",
                   "qk_scale": "fp32", "sm_scale": "fp32", "dropout_p": "fp32"}


def signature(fn, dtype: str, consts: dict, types: dict) -> dict:
    """Triton signature of ``fn``: constexprs, ``types`` (where "x" means the data dtype), else i32."""
    sig = {}
    for name in fn.arg_names:
        t = "constexpr" if name in consts else types.get(name, "i32")
        sig[name] = f"*{dtype}" if t == "x" else t
    return sig


def compile_one(label: str, fn, dtype: str, consts: dict, types: dict, target, num_warps=4, num_stages=None) -> bool:
    """Compile one specialisation; print ok or the error (its tail: where triton names the cause)."""
    options = dict(num_warps=num_warps)
    if num_stages is not None:
        options["num_stages"] = num_stages
    try:
        triton.compile(ASTSource(fn, signature(fn, dtype, consts, types), consts), target=target, options=options)
        print(f"{label}: ok")
        return True
    except Exception as exc:  # report every kernel, then fail
        print(f"{label}: FAILED {str(exc)[-3000:]}")
        return False


def attention_and_qformer(arch: int, dtype: str, dims: list[int], target) -> bool:
    from mmkernels.kernels import attention as A
    from mmkernels.kernels import attention_varlen as VL
    from mmkernels.kernels import qformer as Q

    ok = True
    types = dict(ATTENTION_TYPES, **{n: "x" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")})
    for d in dims:
        d0, d1 = A.split_head_dim(d)
        for name, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
            cfg = A._gpu_configs(name, d, TORCH_DTYPES[dtype])[0]
            consts = dict(HEAD_DIM=d, D0=d0, D1=d1, MASK_KIND=1, IS_CAUSAL=True, HAS_DROPOUT=True, ROTARY=0,
                          PREC="tf32", UPCAST=False, **cfg.kwargs)
            if name == "dq":
                consts["MASK_GRAD"] = False
            ok &= compile_one(f"sm_{arch} {dtype} d={d} {name}", fn, dtype, consts, types, target,
                              cfg.num_warps, cfg.num_stages)
        # packed (varlen) kernels with the vision rotary fused (Qwen2-VL's configuration); bf16
        # only: each specialisation costs ~15 s of CPU here and the other dtypes share the code
        for name in ("fwd", "dkdv", "dq") if dtype == "bf16" else ():
            cfg = VL._gpu_configs(name, d, TORCH_DTYPES[dtype])[0]
            consts = dict(HEAD_DIM=d, D0=d0, D1=d1, IS_CAUSAL=True, HAS_DROPOUT=True, ROTARY=1 if d % 2 == 0 else 0,
                          PREC="tf32", UPCAST=False, SCAN=VL._SCAN, **cfg.kwargs)
            ok &= compile_one(f"sm_{arch} {dtype} d={d} varlen {name}", VL._KERNELS[name], dtype, consts, types,
                              target, cfg.num_warps, cfg.num_stages)
        # attention scores (FastV / VisionZip): statistics pass + column sums, one selected row (BLOCK_M 16)
        from mmkernels.kernels import attention_scores as S

        for name, fn in (("stats", S._scores_stats), ("colsum", S._scores_colsum)):
            cfg = S._gpu_configs(name, d, TORCH_DTYPES[dtype], S._block_m(1))[0]
            consts = dict(HEAD_DIM=d, D0=d0, D1=d1, MASK_KIND=2, IS_CAUSAL=True, PREC="tf32", UPCAST=False,
                          **cfg.kwargs)
            types_s = dict(types, ROWS="*i64", OUT="*fp32", MASK="x")
            ok &= compile_one(f"sm_{arch} {dtype} d={d} scores {name}", fn, dtype, consts, types_s, target,
                              cfg.num_warps, cfg.num_stages)
    # the fused Q-Former forward at BLIP-2's shape (d = 64)
    cfg = Q._configs(TORCH_DTYPES[dtype])[0]
    consts = dict(HEAD_DIM=64, BLOCK_D=64, MASK_KIND=2, HAS_DROPOUT=True, PREC="tf32", UPCAST=False,
                  BLOCK_M=32, **cfg.kwargs)
    types = dict(ATTENTION_TYPES, **{n: "x" for n in ("X", "E", "WQ", "BQ", "WK", "BK", "WV", "BV", "O")})
    ok &= compile_one(f"sm_{arch} {dtype} qformer fwd", Q._qformer_fwd, dtype, consts, types, target,
                      cfg.num_warps, cfg.num_stages)
    return ok


def token_pool(arch: int, dtype: str, target) -> bool:
    from mmkernels.kernels import token_pool as T

    ok = True
    scalars = {"scale_h": "fp32", "scale_w": "fp32", "eps": "fp32"}
    for mode, norm in [(0, 2), (1, 0), (2, 1), (3, 1)]:
        consts = dict(MODE=mode, KH=2, KW=2, SH=2, SW=2, HAS_CLS=True, KEEP_CLS=mode != 3, NORM=norm,
                      HAS_WEIGHT=norm > 0, HAS_BIAS=norm == 1, SAVE_IDX=mode == 1, SAVE_Y=norm > 0 and mode != 3,
                      BLOCK_R=4, BLOCK_C=1024 if norm else 256)
        types = dict(scalars, X="x", NW="*fp32", NB="*fp32", OUT="x", IDX="*i16", Y="x")
        ok &= compile_one(f"sm_{arch} {dtype} fwd mode={mode} norm={norm}", T._token_pool_fwd, dtype, consts,
                          types, target, num_warps=8 if norm else 4)
    for mode in (0, 3):
        consts = dict(MODE=mode, KH=2, KW=2, HAS_CLS=True, NORM=1, HAS_WEIGHT=True, RECOMPUTE=mode == 3,
                      BLOCK_R=2, BLOCK_C=2048)
        types = dict(scalars, G="x", X="x", Y="x", NW="x", DY="*fp32", DX="x", DW_PART="*fp32", DB_PART="*fp32")
        ok &= compile_one(f"sm_{arch} {dtype} norm_bwd mode={mode}", T._token_pool_norm_bwd, dtype, consts, types,
                          target, num_warps=8)
    for mode in range(4):
        consts = dict(MODE=mode, KH=3, KW=3, SH=2, SW=2, NTH=4, NTW=4, HAS_CLS=True, KEEP_CLS=mode != 3,
                      BLOCK_T=8, BLOCK_C=256)
        types = dict(scalars, G="*fp32", IDX="*i16", DX="x")
        ok &= compile_one(f"sm_{arch} {dtype} bwd mode={mode}", T._token_pool_bwd, dtype, consts, types, target)
    return ok


def main() -> int:
    arch, dtype, rest = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    target = GPUTarget("cuda", arch, 32)
    if rest == ["token_pool"]:
        ok = token_pool(arch, dtype, target)
    else:
        ok = attention_and_qformer(arch, dtype, [int(x) for x in rest], target)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
