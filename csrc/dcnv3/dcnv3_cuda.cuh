// DCNv3 on CUDA, the interface: the Kernels type that dcnv3_host.h binds (dcnv3_cuda.cpp), whose forward/backward are
// defined in dcnv3_cuda_kernels.cuh and instantiated for each dtype pair in its own translation unit
// (dcnv3_cuda_f64.cu, _f32, _f16, _bf16), so that a build compiles them in parallel.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace at {
class Tensor;
}  // namespace at

#include "dcnv3_math.h"

namespace dcnv3 {

struct CudaKernels {
  static c10::cuda::CUDAGuard enter(const at::Tensor& input);  // dcnv3_cuda.cpp

  template <typename scalar_t, typename offset_t>
  static void forward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                      scalar_t* output);

  template <typename scalar_t, typename offset_t>
  static void backward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                       const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input, offset_t* grad_offset,
                       offset_t* grad_mask);
};

}  // namespace dcnv3
