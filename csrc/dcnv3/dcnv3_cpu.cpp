// Fused DCNv3 on the CPU: parallel over output positions (forward) or (image, group) pairs (backward), no
// materialised sampling grids, bilinear taps computed once per point and applied to a whole group's channels.
// at::parallel_for spreads work over threads only when this file is compiled with -fopenmp (torch's parallel backend
// is OpenMP and its header is inline); pretrain/ops/build.py passes it, and the #error below keeps it so.
#include <ATen/Parallel.h>

#ifndef _OPENMP
#error "dcnv3_cpu.cpp needs -fopenmp: without it at::parallel_for runs on one thread"
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

#include "dcnv3_host.h"
#include "dcnv3_math.h"

namespace dcnv3 {
namespace {

// kChannels > 0: group_channels known at compile time (the widths InternImage uses), so the channel loops unroll
// into fixed-width vector code and the accumulator lives in registers; 0: any width.
template <typename scalar_t, typename offset_t, int kChannels>
void forward_cpu_impl(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                      scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = geo.channels(), P = geo.points, G = geo.group;
  const int64_t D = kChannels > 0 ? kChannels : geo.group_channels;
  const int64_t positions = geo.batch * geo.height_out * geo.width_out;
  const int64_t hw_in = geo.height_in * geo.width_in;
  // Grain: enough positions per task to amortise scheduling, few enough to balance.
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, G * P * D / 16));
  at::parallel_for(0, positions, grain, [&](int64_t begin, int64_t end) {
    acc_t fixed[kChannels > 0 ? kChannels : 1];
    std::vector<acc_t> dynamic(kChannels > 0 ? 0 : D);
    acc_t* acc = kChannels > 0 ? fixed : dynamic.data();
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t n = pos / (geo.height_out * geo.width_out);
      const int64_t hw = pos % (geo.height_out * geo.width_out);
      const int64_t h_out = hw / geo.width_out, w_out = hw % geo.width_out;
      const offset_t* off_pos = offset + pos * G * P * 2;
      const offset_t* mask_pos = mask + pos * G * P;
      scalar_t* out_pos = output + pos * C;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t c = 0; c < D; ++c) acc[c] = acc_t(0);
        const scalar_t* data = input + n * hw_in * C + g * D;
        for (int64_t p = 0; p < P; ++p) {
          const acc_t m = static_cast<acc_t>(mask_pos[g * P + p]);
          acc_t loc_h, loc_w;
          sampling_location<acc_t>(geo, h_out, w_out, p, static_cast<acc_t>(off_pos[(g * P + p) * 2]),
                                   static_cast<acc_t>(off_pos[(g * P + p) * 2 + 1]), &loc_h, &loc_w);
          const Taps<acc_t> t = bilinear_taps<acc_t>(loc_h, loc_w, geo.height_in, geo.width_in);
          if (!t.any || m == acc_t(0)) continue;
          const acc_t w0 = t.weight[0] * m, w1 = t.weight[1] * m, w2 = t.weight[2] * m, w3 = t.weight[3] * m;
          const scalar_t* v0 = data + t.index[0] * C;
          const scalar_t* v1 = data + t.index[1] * C;
          const scalar_t* v2 = data + t.index[2] * C;
          const scalar_t* v3 = data + t.index[3] * C;
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) {
            acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) +
                      w2 * static_cast<acc_t>(v2[c]) + w3 * static_cast<acc_t>(v3[c]);
          }
        }
        for (int64_t c = 0; c < D; ++c) out_pos[g * D + c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// Backward of the positions [hw_begin, hw_end) of image n, group g: scatters into gin (this image's grad_input,
// already offset to the group's first channel) and writes the race-free per-(position, group, point) gradients.
template <typename scalar_t, typename offset_t, int kChannels>
void backward_slice(const Geometry& geo, int64_t n, int64_t g, int64_t hw_begin, int64_t hw_end,
                    const scalar_t* input, const offset_t* offset, const offset_t* mask, const scalar_t* grad_output,
                    at::opmath_type<scalar_t>* gin, offset_t* grad_offset, offset_t* grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = geo.channels(), D = geo.group_channels, P = geo.points, G = geo.group;
  const int64_t hw_out = geo.height_out * geo.width_out, hw_in = geo.height_in * geo.width_in;
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  const scalar_t* data = input + n * hw_in * C + g * D;
  for (int64_t hw = hw_begin; hw < hw_end; ++hw) {
    const int64_t pos = n * hw_out + hw;
    const int64_t h_out = hw / geo.width_out, w_out = hw % geo.width_out;
    const scalar_t* gout = grad_output + pos * C + g * D;
    const int64_t base_mask = pos * G * P + g * P;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t mi = base_mask + p;
      const acc_t m = static_cast<acc_t>(mask[mi]);
      acc_t loc_h, loc_w;
      sampling_location<acc_t>(geo, h_out, w_out, p, static_cast<acc_t>(offset[mi * 2]),
                               static_cast<acc_t>(offset[mi * 2 + 1]), &loc_h, &loc_w);
      const Taps<acc_t> t = bilinear_taps<acc_t>(loc_h, loc_w, geo.height_in, geo.width_in);
      acc_t g_mask = 0, g_x = 0, g_y = 0;
      if (t.any) {
        point_backward<scalar_t, acc_t, PlainAdd, kChannels>(data, gin, C, gout, D, t, m, scale, &g_mask, &g_x, &g_y);
      }
      grad_mask[mi] = static_cast<offset_t>(g_mask);
      grad_offset[mi * 2] = static_cast<offset_t>(g_x);
      grad_offset[mi * 2 + 1] = static_cast<offset_t>(g_y);
    }
  }
}

// grad_input is a scatter: taps of different positions hit the same input pixels. Tasks are (image, group) slices,
// each owning its part of grad_input, so no atomics are needed and every element is summed in the same order as on
// one thread: the result does not depend on the thread count. Only when there are fewer slices than threads is each
// slice's range of output positions split into `chunks`; chunk k > 0 scatters into its own zeroed copy of grad_input,
// added afterwards in chunk order (deterministic for a given thread count, (chunks - 1) x grad_input extra memory).
template <typename scalar_t, typename offset_t, int kChannels>
void backward_cpu_impl(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                       const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input, offset_t* grad_offset,
                       offset_t* grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = geo.channels(), D = geo.group_channels, G = geo.group;
  const int64_t hw_out = geo.height_out * geo.width_out, hw_in = geo.height_in * geo.width_in;
  const int64_t slices = geo.batch * G, threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t chunks = slices >= threads ? 1 : std::min<int64_t>(hw_out, (threads + slices - 1) / slices);
  const int64_t input_numel = geo.batch * hw_in * C;
  std::vector<acc_t> partial(static_cast<size_t>((chunks - 1) * input_numel), acc_t(0));
  at::parallel_for(0, slices * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t slice = task / chunks, chunk = task % chunks;
      const int64_t n = slice / G, g = slice % G;
      acc_t* target = chunk == 0 ? grad_input : partial.data() + (chunk - 1) * input_numel;
      backward_slice<scalar_t, offset_t, kChannels>(geo, n, g, hw_out * chunk / chunks, hw_out * (chunk + 1) / chunks,
                                                    input, offset, mask, grad_output, target + n * hw_in * C + g * D,
                                                    grad_offset, grad_mask);
    }
  });
  if (chunks == 1) return;
  at::parallel_for(0, input_numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = 1; k < chunks; ++k) {
      const acc_t* part = partial.data() + (k - 1) * input_numel;
      for (int64_t i = begin; i < end; ++i) grad_input[i] += part[i];
    }
  });
}

// Calls fn with std::integral_constant<int, group_channels> for the widths InternImage uses, else with 0 (generic).
template <typename Fn>
void with_channels(int64_t group_channels, Fn&& fn) {
  switch (group_channels) {
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    default: fn(std::integral_constant<int, 0>{});
  }
}

struct CpuKernels {
  struct NoGuard {};
  static NoGuard enter(const at::Tensor& input) {
    TORCH_CHECK(input.device().is_cpu(), "dcnv3 CPU extension: tensors must be on the CPU, got ", input.device());
    return {};
  }
  template <typename scalar_t, typename offset_t>
  static void forward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                      scalar_t* output) {
    with_channels(geo.group_channels, [&](auto k) {
      forward_cpu_impl<scalar_t, offset_t, decltype(k)::value>(geo, input, offset, mask, output);
    });
  }
  template <typename scalar_t, typename offset_t>
  static void backward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                       const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input, offset_t* grad_offset,
                       offset_t* grad_mask) {
    with_channels(geo.group_channels, [&](auto k) {
      backward_cpu_impl<scalar_t, offset_t, decltype(k)::value>(geo, input, offset, mask, grad_output, grad_input,
                                                                grad_offset, grad_mask);
    });
  }
};

}  // namespace
}  // namespace dcnv3

DCNV3_BIND(dcnv3::CpuKernels, "DCNv3 fused CPU kernels (layouts in csrc/dcnv3/dcnv3_math.h)")
