// The DCNv3 CUDA extension's bindings (dcnv3_host.h): argument checks, allocation and dtype dispatch on the host,
// launching the kernels of dcnv3_cuda_kernels.cuh, which dcnv3_cuda_f64.cu, _f32, _f16 and _bf16 instantiate (one
// translation unit per dtype, compiled in parallel). Host code only: the C++ compiler takes it, not nvcc.
#include "dcnv3_cuda.cuh"
#include "dcnv3_host.h"

// Instantiated, for every (input dtype, offset dtype) pair that DCNV3_DISPATCH can ask for, in dcnv3_cuda_f64.cu
// (double with double or float offsets), _f32.cu (float), _f16.cu and _bf16.cu (with their own or float offsets).
c10::cuda::CUDAGuard dcnv3::CudaKernels::enter(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "dcnv3 CUDA extension: tensors must be on a CUDA device, got ", input.device());
  return c10::cuda::CUDAGuard(input.device());
}

DCNV3_BIND(dcnv3::CudaKernels, "DCNv3 CUDA kernels (layouts in csrc/dcnv3/dcnv3_math.h)")
