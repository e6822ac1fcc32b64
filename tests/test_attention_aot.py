"""GPU code generation checked on a CPU machine: the interpreter never lowers to PTX, so a
kernel that only compiles in the interpreter would pass every other test here and still
fail on the first CUDA launch.  Triton compiles for a CUDA target without a GPU."""

import pytest
from helpers import run_aot_compile, triton_has_cuda_backend


@pytest.mark.skipif(not triton_has_cuda_backend(), reason="triton has no NVIDIA backend on this platform")
@pytest.mark.parametrize("arch,dtype,dims", [(90, "bf16", ["88"]), (90, "fp32", ["128"]), (80, "fp16", ["72"])],
                         ids=["sm90-bf16-d88", "sm90-fp32-d128", "sm80-fp16-d72"])
def test_kernels_compile_for_cuda(arch, dtype, dims):
    res = run_aot_compile(str(arch), dtype, *dims)
    assert res.returncode == 0, res.stdout + res.stderr
