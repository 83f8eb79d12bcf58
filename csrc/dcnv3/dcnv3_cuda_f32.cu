// DCNv3 CUDA kernels instantiated for f32 inputs (see dcnv3_cuda_kernels.cuh).
#include "dcnv3_cuda_kernels.cuh"

DCNV3_CUDA_INSTANTIATE(float, float)
