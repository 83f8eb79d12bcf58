// DCNv3 CUDA kernels instantiated for f64 inputs (see dcnv3_cuda_kernels.cuh).
#include "dcnv3_cuda_kernels.cuh"

DCNV3_CUDA_INSTANTIATE(double, double)
DCNV3_CUDA_INSTANTIATE(double, float)
