// DCNv3 on CUDA: float32, float64, float16 and bfloat16 (accumulating in float32), any batch size, one launch per call.
// Forward: one thread per output element (n, h, w, g, c), channels fastest so reads of a tap's channels coalesce.
// Backward, group_channels a power of two up to 32 (every InternImage size: 16 for T..XL, 32 for H/G): one lane per
// channel as in the forward, so the atomicAdds into grad_input hit consecutive addresses, and grad_offset/grad_mask
// are reduced over the group's lanes with warp shuffles. Other group_channels: one thread per (n, h, w, g, point),
// looping over the channels. grad_input accumulates in an opmath (float32 for half/bf16) buffer.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "dcnv3_host.h"
#include "dcnv3_math.h"

namespace dcnv3 {
namespace {

constexpr int kThreads = 256;

struct AtomicAdd {
  template <typename T>
  __host__ __device__ static void apply(T* address, T value) {
#ifdef __CUDA_ARCH__
    if (value != T(0)) atomicAdd(address, value);  // taps outside the image carry weight 0: skip their atomics
#else
    *address += value;
#endif
  }
};

inline unsigned int blocks_for(int64_t total) {
  // Grid-stride loops cover the rest; the cap keeps the grid valid for any batch size. kThreads is a multiple of 32,
  // which the lane kernel's shuffles rely on.
  static_assert(kThreads % 32 == 0, "whole warps");
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

template <typename scalar_t, typename offset_t>
__global__ void forward_kernel(const Geometry geo, const scalar_t* __restrict__ input,
                               const offset_t* __restrict__ offset, const offset_t* __restrict__ mask,
                               scalar_t* __restrict__ output, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = geo.channels(), D = geo.group_channels, P = geo.points, G = geo.group;
  const int64_t hw_out = geo.height_out * geo.width_out, hw_in = geo.height_in * geo.width_in;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = i % D;
    const int64_t g = (i / D) % G;
    const int64_t pos = i / (D * G);
    const int64_t n = pos / hw_out, hw = pos % hw_out;
    const int64_t h_out = hw / geo.width_out, w_out = hw % geo.width_out;
    const scalar_t* data = input + n * hw_in * C + g * D;
    const offset_t* off = offset + (pos * G + g) * P * 2;
    const offset_t* msk = mask + (pos * G + g) * P;
    acc_t acc = 0;
    for (int64_t p = 0; p < P; ++p) {
      const acc_t m = static_cast<acc_t>(msk[p]);
      acc_t loc_h, loc_w;
      sampling_location<acc_t>(geo, h_out, w_out, p, static_cast<acc_t>(off[2 * p]), static_cast<acc_t>(off[2 * p + 1]),
                               &loc_h, &loc_w);
      const Taps<acc_t> t = bilinear_taps<acc_t>(loc_h, loc_w, geo.height_in, geo.width_in);
      if (t.any) acc += m * sample<scalar_t, acc_t>(data, C, t, c);
    }
    output[pos * C + g * D + c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename offset_t>
__global__ void backward_kernel(const Geometry geo, const scalar_t* __restrict__ input,
                                const offset_t* __restrict__ offset, const offset_t* __restrict__ mask,
                                const scalar_t* __restrict__ grad_output, at::opmath_type<scalar_t>* grad_input,
                                offset_t* __restrict__ grad_offset, offset_t* __restrict__ grad_mask, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = geo.channels(), D = geo.group_channels, P = geo.points, G = geo.group;
  const int64_t hw_out = geo.height_out * geo.width_out, hw_in = geo.height_in * geo.width_in;
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t p = i % P;
    const int64_t g = (i / P) % G;
    const int64_t pos = i / (P * G);
    const int64_t n = pos / hw_out, hw = pos % hw_out;
    const int64_t h_out = hw / geo.width_out, w_out = hw % geo.width_out;
    const acc_t m = static_cast<acc_t>(mask[i]);
    acc_t loc_h, loc_w;
    sampling_location<acc_t>(geo, h_out, w_out, p, static_cast<acc_t>(offset[2 * i]),
                             static_cast<acc_t>(offset[2 * i + 1]), &loc_h, &loc_w);
    const Taps<acc_t> t = bilinear_taps<acc_t>(loc_h, loc_w, geo.height_in, geo.width_in);
    acc_t g_mask = 0, g_x = 0, g_y = 0;
    if (t.any) {
      point_backward<scalar_t, acc_t, AtomicAdd>(input + n * hw_in * C + g * D, grad_input + n * hw_in * C + g * D, C,
                                                 grad_output + pos * C + g * D, D, t, m, scale, &g_mask, &g_x, &g_y);
    }
    grad_mask[i] = static_cast<offset_t>(g_mask);
    grad_offset[2 * i] = static_cast<offset_t>(g_x);
    grad_offset[2 * i + 1] = static_cast<offset_t>(g_y);
  }
}

// One lane per channel; LANES = group_channels, a power of two <= 32, so a group's lanes sit inside one warp.
template <typename scalar_t, typename offset_t, int LANES>
__global__ void backward_lanes_kernel(const Geometry geo, const scalar_t* __restrict__ input,
                                      const offset_t* __restrict__ offset, const offset_t* __restrict__ mask,
                                      const scalar_t* __restrict__ grad_output, at::opmath_type<scalar_t>* grad_input,
                                      offset_t* __restrict__ grad_offset, offset_t* __restrict__ grad_mask,
                                      int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = geo.channels(), P = geo.points, G = geo.group;
  const int64_t hw_out = geo.height_out * geo.width_out, hw_in = geo.height_in * geo.width_in;
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  // Whole warps iterate together (blockDim and the start are multiples of 32), so every shuffle has all 32 lanes;
  // lanes past the end work on the last element and write nothing.
  const int64_t padded = (total + 31) / 32 * 32;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < padded;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const bool active = i < total;
    const int64_t j = active ? i : total - 1;
    const int64_t c = j % LANES;
    const int64_t g = (j / LANES) % G;
    const int64_t pos = j / (LANES * G);
    const int64_t n = pos / hw_out, hw = pos % hw_out;
    const int64_t h_out = hw / geo.width_out, w_out = hw % geo.width_out;
    const int64_t image = n * hw_in * C + g * LANES + c;
    const int64_t point0 = (pos * G + g) * P;
    for (int64_t p = 0; p < P; ++p) {
      const acc_t m = static_cast<acc_t>(mask[point0 + p]);
      acc_t loc_h, loc_w;
      sampling_location<acc_t>(geo, h_out, w_out, p, static_cast<acc_t>(offset[2 * (point0 + p)]),
                               static_cast<acc_t>(offset[2 * (point0 + p) + 1]), &loc_h, &loc_w);
      const Taps<acc_t> t = bilinear_taps<acc_t>(loc_h, loc_w, geo.height_in, geo.width_in);
      acc_t g_mask = 0, g_x = 0, g_y = 0;
      if (active && t.any) {
        point_backward<scalar_t, acc_t, AtomicAdd>(input + image, grad_input + image, C,
                                                   grad_output + pos * C + g * LANES + c, 1, t, m, scale, &g_mask,
                                                   &g_x, &g_y);
      }
#pragma unroll
      for (int s = LANES / 2; s > 0; s /= 2) {
        g_mask += __shfl_xor_sync(0xffffffffu, g_mask, s);
        g_x += __shfl_xor_sync(0xffffffffu, g_x, s);
        g_y += __shfl_xor_sync(0xffffffffu, g_y, s);
      }
      if (active && c == 0) {
        grad_mask[point0 + p] = static_cast<offset_t>(g_mask);
        grad_offset[2 * (point0 + p)] = static_cast<offset_t>(g_x);
        grad_offset[2 * (point0 + p) + 1] = static_cast<offset_t>(g_y);
      }
    }
  }
}

struct CudaKernels {
  static c10::cuda::CUDAGuard enter(const at::Tensor& input) {
    TORCH_CHECK(input.is_cuda(), "dcnv3 CUDA extension: tensors must be on a CUDA device, got ", input.device());
    return c10::cuda::CUDAGuard(input.device());
  }
  template <typename scalar_t, typename offset_t>
  static void forward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                      scalar_t* output) {
    const int64_t total = geo.batch * geo.height_out * geo.width_out * geo.channels();
    forward_kernel<scalar_t, offset_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        geo, input, offset, mask, output, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, typename offset_t>
  static void backward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                       const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input, offset_t* grad_offset,
                       offset_t* grad_mask) {
    const int64_t positions = geo.batch * geo.height_out * geo.width_out;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t lanes_total = positions * geo.group * geo.group_channels;
#define DCNV3_LANES_CASE(LANES)                                                                               \
  case LANES:                                                                                                 \
    backward_lanes_kernel<scalar_t, offset_t, LANES><<<blocks_for(lanes_total), kThreads, 0, stream>>>(       \
        geo, input, offset, mask, grad_output, grad_input, grad_offset, grad_mask, lanes_total);              \
    break;
    switch (geo.group_channels) {
      DCNV3_LANES_CASE(1)
      DCNV3_LANES_CASE(2)
      DCNV3_LANES_CASE(4)
      DCNV3_LANES_CASE(8)
      DCNV3_LANES_CASE(16)
      DCNV3_LANES_CASE(32)
      default: {
        const int64_t total = positions * geo.group * geo.points;
        backward_kernel<scalar_t, offset_t><<<blocks_for(total), kThreads, 0, stream>>>(
            geo, input, offset, mask, grad_output, grad_input, grad_offset, grad_mask, total);
      }
    }
#undef DCNV3_LANES_CASE
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace dcnv3

DCNV3_BIND(dcnv3::CudaKernels, "DCNv3 CUDA kernels (layouts in csrc/dcnv3/dcnv3_math.h)")
