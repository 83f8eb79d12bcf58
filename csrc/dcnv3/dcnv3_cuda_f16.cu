// DCNv3 CUDA kernels instantiated for f16 inputs (see dcnv3_cuda_kernels.cuh).
#include "dcnv3_cuda_kernels.cuh"

DCNV3_CUDA_INSTANTIATE(c10::Half, c10::Half)
DCNV3_CUDA_INSTANTIATE(c10::Half, float)
