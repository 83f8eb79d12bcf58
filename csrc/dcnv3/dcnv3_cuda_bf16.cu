// DCNv3 CUDA kernels instantiated for bf16 inputs (see dcnv3_cuda_kernels.cuh).
#include "dcnv3_cuda_kernels.cuh"

DCNV3_CUDA_INSTANTIATE(c10::BFloat16, c10::BFloat16)
DCNV3_CUDA_INSTANTIATE(c10::BFloat16, float)
