"""FLOP and byte models: what "TFLOP/s" and "GB/s" in a report divide by.

Conventions (stated in every results file under ``flop_convention``):

- attention: the FlashAttention papers' count. fwd = 2·B·H·Lq·Lk·(d + dv) (QKᵀ and PV, two FLOPs
  per multiply-add), halved when causal; bwd = 2.5 × fwd (five matmuls to the forward's two);
  fwd+bwd = 3.5 × fwd. Softmax, scaling and masks are not counted; a padding mask does not
  reduce the count (the work a dense kernel does).
- qformer cross-attention: the three projections (2·B·Lq·Dq² for Q, 2·2·B·Lk·Dk·Dq for K and V)
  plus the attention above with d = dv = Dq / H; bwd = 2 × projections (input and weight grads)
  + 2.5 × attention.
- bytes: the minimum traffic of an ideal fused kernel — every input read once, every output
  written once (the pooling's GB/s is against this; a kernel that reads twice shows as slower).
  Token pooling's backward adds its gradients: dout read once, dx (and the norm's dweight/dbias)
  written once; what a kernel saves for its backward is its own cost, not counted.
"""

from __future__ import annotations

__all__ = [
    "ATTENTION_CONVENTION",
    "BYTES_CONVENTION",
    "MODE_FACTOR",
    "QFORMER_CONVENTION",
    "attention_bytes",
    "attention_flops",
    "matmul_flops",
    "qformer_bytes",
    "qformer_flops",
    "token_pool_bytes",
]

MODES = ("fwd", "bwd", "fwd+bwd")
#: attention backward does 2.5x the forward's matmul work (dV, dP, dS->dQ, dK, and P recomputed)
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

ATTENTION_CONVENTION = (
    "fwd = 2*B*H*Lq*Lk*(d+dv) (QK^T and PV, 2 FLOPs per multiply-add), halved when causal; "
    "bwd = 2.5 * fwd; fwd+bwd = 3.5 * fwd; softmax/exp and masks not counted (the FlashAttention papers' convention)"
)
QFORMER_CONVENTION = (
    "projections 2*B*Lq*Dq*Dq + 4*B*Lk*Dk*Dq plus attention 4*B*Lq*Lk*Dq; "
    "bwd = 2 * projections + 2.5 * attention; fwd+bwd = the sum"
)
BYTES_CONVENTION = (
    "minimum traffic: fwd reads x once and writes the output once (+ the norm's weight/bias read once); "
    "bwd reads dout once and writes dx once (+ dweight/dbias written once); fwd+bwd = the sum; "
    "saved tensors and workspaces are not counted (they are the implementation's cost)"
)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, expected one of {MODES}")


def matmul_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def attention_flops(B: int, H: int, Lq: int, Lk: int, d: int, dv: int | None = None, *,
                    causal: bool = False, mode: str = "fwd") -> float:
    _check_mode(mode)
    dv = d if dv is None else dv
    fwd = 2.0 * B * H * Lq * Lk * (d + dv) * (0.5 if causal else 1.0)
    return fwd * MODE_FACTOR[mode]


def attention_bytes(B: int, H: int, Lq: int, Lk: int, d: int, dv: int | None = None, *,
                    itemsize: int, mode: str = "fwd") -> float:
    """q, k, v read once, o written once (fwd); bwd reads q, k, v, o, do and writes dq, dk, dv."""
    _check_mode(mode)
    dv = d if dv is None else dv
    q, k, v, o = B * H * Lq * d, B * H * Lk * d, B * H * Lk * dv, B * H * Lq * dv
    fwd = q + k + v + o
    bwd = (q + k + v + 2 * o) + (q + k + v)
    return float(itemsize * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def qformer_flops(B: int, Lq: int, Lk: int, Dq: int, Dk: int, H: int, *, mode: str = "fwd") -> float:
    _check_mode(mode)
    proj = matmul_flops(B * Lq, Dq, Dq) + 2 * matmul_flops(B * Lk, Dq, Dk)
    attn = attention_flops(B, H, Lq, Lk, Dq // H)
    return {"fwd": proj + attn, "bwd": 2 * proj + 2.5 * attn, "fwd+bwd": 3 * proj + 3.5 * attn}[mode]


def qformer_bytes(B: int, Lq: int, Lk: int, Dq: int, Dk: int, *, itemsize: int, mode: str = "fwd") -> float:
    """hidden, encoder states and the three weights/biases read once, the context written once
    (K and V never reach memory in a fused kernel); bwd: the mirror image plus dout."""
    _check_mode(mode)
    weights = Dq * Dq + 2 * Dq * Dk + 3 * Dq
    fwd = B * Lq * Dq + B * Lk * Dk + weights + B * Lq * Dq
    bwd = fwd + B * Lq * Dq + B * Lk * Dk + weights  # + grads of the inputs and weights
    return float(itemsize * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def token_pool_bytes(B: int, n_in: int, c_in: int, n_out: int, c_out: int, *, itemsize: int,
                     mode: str = "fwd", norm_params: int = 0) -> float:
    """fwd: x (B, n_in, c_in) read once, out (B, n_out, c_out) written once, ``norm_params``
    elements read. bwd: dout read once, dx written once, the parameters' grads written once."""
    _check_mode(mode)
    x, out = B * n_in * c_in, B * n_out * c_out
    fwd = x + out + norm_params
    bwd = out + x + norm_params
    return float(itemsize * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])
