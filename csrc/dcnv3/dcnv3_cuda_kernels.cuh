// DCNv3 on CUDA: float32, float64, float16 and bfloat16 (accumulating in float32), any batch size, one launch per call.
//
// Chunked kernels (the default). A thread owns kVec consecutive channels of one (position, group): it computes each
// point's sampling location and bilinear taps once for its whole chunk (sampling math from dcnv3_math.h), keeps the
// group's offsets and mask in registers when the point count is a template parameter (9 = 3x3), loads a tap's
// channels with one vector load and indexes in 32 bits inside a tensor. Blocks are 3-D: x the chunks of one group
// (the lanes), y groups, z output positions; threads per block come from kLaunchTable (or DCNV3_CUDA_THREADS).
//   forward:  kVec = 16 bytes of input (4 fp32, 8 fp16/bf16, 2 fp64); kVec = 1 when the group width is not a multiple
//             of it or a pointer is not 16-byte aligned (scalar loads, any width up to kMaxThreads).
//   backward: kVec = 4 (2 for fp64) channels per lane, D / kVec lanes per group (2..16, i.e. group widths 8..64 for
//             32/16-bit, 4..32 for fp64); each lane dots grad_output with the four taps, the group's lanes reduce
//             grad_offset/grad_mask with warp shuffles, and grad_input (opmath: float32 for half/bf16) takes one
//             vector atomicAdd per tap (float2/float4 on sm_90, scalar atomics below).
// Legacy kernels (one thread per channel, 64-bit indexing) run every case the chunked ones do not take: tensors past
// 2^31 elements, backward group widths outside the list above, and everything when DCNV3_CUDA_KERNEL=legacy (read
// once per process; kept so that benchmarks/dcnv3.py can compare old and new in one build).
//
// This header holds the kernels and their launchers; dcnv3_cuda_<dtype>.cu instantiate them (DCNV3_CUDA_INSTANTIATE).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "dcnv3_cuda.cuh"
#include "dcnv3_math.h"

namespace dcnv3 {
namespace cuda_impl {

constexpr int kThreads = 256;
constexpr int kMaxThreads = 256;  // chunked kernels: with 512 ptxas capped them at 64 registers and spilled (sm_90)

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

// ---------------------------------------------------------------------------------------------------------------
// Legacy kernels: one thread per output channel (forward) or channel/point (backward), 64-bit indices.

template <typename scalar_t, typename offset_t>
__global__ void legacy_forward_kernel(const Geometry geo, const scalar_t* __restrict__ input,
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
__global__ void legacy_backward_kernel(const Geometry geo, const scalar_t* __restrict__ input,
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
__global__ void legacy_backward_lanes_kernel(const Geometry geo, const scalar_t* __restrict__ input,
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


// ---------------------------------------------------------------------------------------------------------------
// Chunked kernels.

// kVec consecutive elements moved by one vector instruction (alignment = the whole pack).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename scalar_t>
constexpr int forward_vec() { return static_cast<int>(16 / sizeof(scalar_t)); }
template <typename scalar_t>
constexpr int backward_vec() { return sizeof(scalar_t) == 8 ? 2 : 4; }

// grad_input[c .. c + kVec) += value: one vector atomic where the architecture has one (float2/float4, sm_90+).
template <int kVec, typename T>
__device__ __forceinline__ void atomic_add_chunk(T* address, const T (&value)[kVec]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVectorAtomic = std::is_same_v<T, float> && (kVec == 4 || kVec == 2);
#else
  constexpr bool kVectorAtomic = false;
#endif
  if constexpr (kVectorAtomic && kVec == 4) {
    atomicAdd(reinterpret_cast<float4*>(address), make_float4(value[0], value[1], value[2], value[3]));
  } else if constexpr (kVectorAtomic && kVec == 2) {
    atomicAdd(reinterpret_cast<float2*>(address), make_float2(value[0], value[1]));
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) atomicAdd(address + i, value[i]);
  }
}

// Per-thread coordinates of a chunked launch: x = lane (chunk of the group), y = group, z = output position.
struct ChunkIndex {
  int lane, group, pos, n, h_out, w_out;
};

__device__ __forceinline__ bool chunk_index(const Geometry& geo, int positions, ChunkIndex* ix) {
  ix->lane = static_cast<int>(threadIdx.x);
  ix->group = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y);
  ix->pos = static_cast<int>(blockIdx.x * blockDim.z + threadIdx.z);
  if (ix->pos >= positions || ix->group >= static_cast<int>(geo.group)) return false;
  const int width_out = static_cast<int>(geo.width_out), hw_out = static_cast<int>(geo.height_out) * width_out;
  ix->n = ix->pos / hw_out;
  const int hw = ix->pos - ix->n * hw_out;
  ix->h_out = hw / width_out;
  ix->w_out = hw - ix->h_out * width_out;
  return true;
}

// The (position, group)'s offsets and mask, in registers when kPoints > 0 (loop fully unrolled), else read per point.
template <typename offset_t, typename acc_t, int kPoints>
struct PointParams {
  static constexpr int kRegs = kPoints > 0 ? kPoints : 1;
  const offset_t* offset;
  const offset_t* mask;
  acc_t off_x[kRegs], off_y[kRegs], m[kRegs];

  __device__ __forceinline__ PointParams(const offset_t* offset_, const offset_t* mask_)
      : offset(offset_), mask(mask_) {
    if constexpr (kPoints > 0) {
#pragma unroll
      for (int p = 0; p < kPoints; ++p) {
        off_x[p] = static_cast<acc_t>(offset[2 * p]);
        off_y[p] = static_cast<acc_t>(offset[2 * p + 1]);
        m[p] = static_cast<acc_t>(mask[p]);
      }
    }
  }
  __device__ __forceinline__ void get(int p, acc_t* x, acc_t* y, acc_t* mk) const {
    if constexpr (kPoints > 0) {
      *x = off_x[p];
      *y = off_y[p];
      *mk = m[p];
    } else {
      *x = static_cast<acc_t>(offset[2 * p]);
      *y = static_cast<acc_t>(offset[2 * p + 1]);
      *mk = static_cast<acc_t>(mask[p]);
    }
  }
};

// Point p of the thread's (position, group): its mask value and bilinear taps (sampling math from dcnv3_math.h).
template <typename acc_t, typename Params>
__device__ __forceinline__ Taps<acc_t, int> point_taps(const Geometry& geo, const ChunkIndex& ix, const Params& params,
                                                       int p, int height, int width, acc_t* m) {
  acc_t off_x, off_y, loc_h, loc_w;
  params.get(p, &off_x, &off_y, m);
  sampling_location<acc_t, int>(geo, ix.h_out, ix.w_out, p, off_x, off_y, &loc_h, &loc_w);
  return bilinear_taps<acc_t, int>(loc_h, loc_w, height, width);
}

template <typename scalar_t, typename offset_t, int kVec, int kPoints>
__global__ void __launch_bounds__(kMaxThreads)
    forward_chunked_kernel(const Geometry geo, const scalar_t* __restrict__ input, const offset_t* __restrict__ offset,
                           const offset_t* __restrict__ mask, scalar_t* __restrict__ output, int positions) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  ChunkIndex ix;
  if (!chunk_index(geo, positions, &ix)) return;
  const int G = static_cast<int>(geo.group), C = G * static_cast<int>(geo.group_channels);
  const int P = kPoints > 0 ? kPoints : static_cast<int>(geo.points);
  const int height = static_cast<int>(geo.height_in), width = static_cast<int>(geo.width_in);
  const int channel0 = ix.group * static_cast<int>(geo.group_channels) + ix.lane * kVec;
  const scalar_t* data = input + ix.n * (height * width * C) + channel0;
  const int point0 = (ix.pos * G + ix.group) * P;
  const PointParams<offset_t, acc_t, kPoints> params(offset + 2 * point0, mask + point0);
  acc_t acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = acc_t(0);
#pragma unroll
  for (int p = 0; p < P; ++p) {
    acc_t m;
    const Taps<acc_t, int> t = point_taps(geo, ix, params, p, height, width, &m);
    if (!t.any) continue;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (!t.inside[k]) continue;
      const acc_t w = t.weight[k] * m;
      const pack_t v = *reinterpret_cast<const pack_t*>(data + t.index[k] * C);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += w * static_cast<acc_t>(to_acc(v.v[i]));
    }
  }
  pack_t out;
#pragma unroll
  for (int i = 0; i < kVec; ++i) out.v[i] = static_cast<scalar_t>(acc[i]);
  *reinterpret_cast<pack_t*>(output + ix.pos * C + channel0) = out;
}

// blockDim.x == kLanes, a power of two <= 32, so a group's lanes are an aligned run of one warp.
template <typename scalar_t, typename offset_t, int kVec, int kLanes, int kPoints>
__global__ void __launch_bounds__(kMaxThreads)
    backward_chunked_kernel(const Geometry geo, const scalar_t* __restrict__ input,
                            const offset_t* __restrict__ offset, const offset_t* __restrict__ mask,
                            const scalar_t* __restrict__ grad_output, at::opmath_type<scalar_t>* __restrict__ grad_input,
                            offset_t* __restrict__ grad_offset, offset_t* __restrict__ grad_mask, int positions) {
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "a group's lanes sit in one warp");
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  ChunkIndex ix;
  // A group's lanes share pos and group, so they leave together: the shuffles below name only the group's lanes.
  if (!chunk_index(geo, positions, &ix)) return;
  const unsigned warp_lane = (threadIdx.x + kLanes * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u;
  const unsigned group_lanes =
      kLanes == 32 ? 0xffffffffu : ((1u << kLanes) - 1u) << (warp_lane & ~static_cast<unsigned>(kLanes - 1));
  const int G = static_cast<int>(geo.group), C = G * static_cast<int>(geo.group_channels);
  const int P = kPoints > 0 ? kPoints : static_cast<int>(geo.points);
  const int height = static_cast<int>(geo.height_in), width = static_cast<int>(geo.width_in);
  const int channel0 = ix.group * static_cast<int>(geo.group_channels) + ix.lane * kVec;
  const int image = ix.n * (height * width * C) + channel0;
  const scalar_t* data = input + image;
  acc_t* grad_data = grad_input + image;
  const int point0 = (ix.pos * G + ix.group) * P;
  const PointParams<offset_t, acc_t, kPoints> params(offset + 2 * point0, mask + point0);
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  acc_t go[kVec];
  {
    const pack_t g = *reinterpret_cast<const pack_t*>(grad_output + ix.pos * C + channel0);
#pragma unroll
    for (int i = 0; i < kVec; ++i) go[i] = static_cast<acc_t>(to_acc(g.v[i]));
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    acc_t m;
    const Taps<acc_t, int> t = point_taps(geo, ix, params, p, height, width, &m);
    acc_t g_mask = 0, g_h = 0, g_w = 0;
    if (t.any) {  // the same for every lane of the group
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!t.inside[k]) continue;
        // sum_c grad_out[c] * value_k[c], then the tap's weight and its derivatives: 3 FMAs per tap, not per channel
        const pack_t v = *reinterpret_cast<const pack_t*>(data + t.index[k] * C);
        acc_t dot = 0;
#pragma unroll
        for (int i = 0; i < kVec; ++i) dot += go[i] * static_cast<acc_t>(to_acc(v.v[i]));
        g_mask += t.weight[k] * dot;
        g_h += t.dweight_dh[k] * dot;
        g_w += t.dweight_dw[k] * dot;
        const acc_t mw = m * t.weight[k];
        if (mw != acc_t(0)) {
          acc_t add[kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) add[i] = mw * go[i];
          atomic_add_chunk<kVec>(grad_data + t.index[k] * C, add);
        }
      }
#pragma unroll
      for (int s = kLanes / 2; s > 0; s /= 2) {
        g_mask += __shfl_xor_sync(group_lanes, g_mask, s, kLanes);
        g_h += __shfl_xor_sync(group_lanes, g_h, s, kLanes);
        g_w += __shfl_xor_sync(group_lanes, g_w, s, kLanes);
      }
    }
    if (ix.lane == p % kLanes) {  // every lane holds the sums; the stores rotate over the lanes
      grad_mask[point0 + p] = static_cast<offset_t>(g_mask);
      grad_offset[2 * (point0 + p)] = static_cast<offset_t>(g_w * m * scale);
      grad_offset[2 * (point0 + p) + 1] = static_cast<offset_t>(g_h * m * scale);
    }
  }
}

// Threads per block by element size and group width. Defaults, not yet measured on a GPU: tune them with
// `benchmarks/dcnv3.py --device cuda --block-threads 64,128,256` (DCNV3_CUDA_THREADS) and write the winners here.
struct LaunchRow {
  int element_bytes, group_channels, forward_threads, backward_threads;
};
constexpr LaunchRow kLaunchTable[] = {
    {4, 16, 256, 256},  // InternImage-T..XL, fp32
    {2, 16, 256, 256},  // InternImage-T..XL, bf16/fp16
    {4, 32, 256, 256},  // InternImage-H/G, fp32
    {2, 32, 256, 256},  // InternImage-H/G, bf16/fp16
};
constexpr int kDefaultThreads = 256;

// DCNV3_CUDA_THREADS="forward[,backward]" overrides the table (read once per process, for tuning).
inline int threads_for(int element_bytes, int64_t group_channels, bool backward) {
  static const int override_threads[2] = {
      [] {
        const char* v = std::getenv("DCNV3_CUDA_THREADS");
        return v ? std::atoi(v) : 0;
      }(),
      [] {
        const char* v = std::getenv("DCNV3_CUDA_THREADS");
        const char* comma = v ? std::strchr(v, ',') : nullptr;
        return comma ? std::atoi(comma + 1) : (v ? std::atoi(v) : 0);
      }()};
  if (override_threads[backward] > 0) return std::min(override_threads[backward], kMaxThreads);
  for (const LaunchRow& row : kLaunchTable) {
    if (row.element_bytes == element_bytes && row.group_channels == group_channels) {
      return backward ? row.backward_threads : row.forward_threads;
    }
  }
  return kDefaultThreads;
}

inline bool legacy_requested() {
  static const bool legacy = [] {
    const char* v = std::getenv("DCNV3_CUDA_KERNEL");
    return v != nullptr && std::strcmp(v, "legacy") == 0;
  }();
  return legacy;
}

// The chunked kernels index in int32: every tensor they touch must have fewer than 2^31 elements.
inline bool fits_int32(const Geometry& geo) {
  const int64_t positions = geo.batch * geo.height_out * geo.width_out;
  const int64_t largest = std::max({geo.batch * geo.height_in * geo.width_in * geo.channels(),
                                    positions * geo.channels(), positions * geo.group * geo.points * 2});
  // The last block's threads compute positions up to one block past the end before chunk_index rejects them:
  // keep that margin inside int too.
  return largest <= INT_MAX - 1024 && geo.group <= 65535;
}

inline bool aligned(const void* pointer, size_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

// Block (lanes, groups, positions) for about `threads` threads; grid (position blocks, group blocks).
inline void chunked_launch_shape(const Geometry& geo, int lanes, int threads, dim3* grid, dim3* block) {
  const int groups = static_cast<int>(std::clamp<int64_t>(threads / lanes, 1, geo.group));
  const int positions_per_block = std::clamp(threads / (lanes * groups), 1, 64);  // blockDim.z <= 64
  const int64_t positions = geo.batch * geo.height_out * geo.width_out;
  *block = dim3(lanes, groups, positions_per_block);
  *grid = dim3(static_cast<unsigned>((positions + positions_per_block - 1) / positions_per_block),
               static_cast<unsigned>((geo.group + groups - 1) / groups));
}

template <int N>
using IntC = std::integral_constant<int, N>;

struct Impl {
  template <typename scalar_t, typename offset_t>
  static void forward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                      scalar_t* output) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    constexpr int kVec = forward_vec<scalar_t>();
    const bool vec = geo.group_channels % kVec == 0 && aligned(input, 16) && aligned(output, 16);
    const int64_t lanes = vec ? geo.group_channels / kVec : geo.group_channels;
    if (legacy_requested() || !fits_int32(geo) || lanes > kMaxThreads) {
      const int64_t total = geo.batch * geo.height_out * geo.width_out * geo.channels();
      legacy_forward_kernel<scalar_t, offset_t><<<blocks_for(total), kThreads, 0, stream>>>(geo, input, offset, mask,
                                                                                            output, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int positions = static_cast<int>(geo.batch * geo.height_out * geo.width_out);
    dim3 grid, block;
    chunked_launch_shape(geo, static_cast<int>(lanes), threads_for(sizeof(scalar_t), geo.group_channels, false),
                         &grid, &block);
    auto launch = [&](auto vec_c, auto points_c) {
      forward_chunked_kernel<scalar_t, offset_t, decltype(vec_c)::value, decltype(points_c)::value>
          <<<grid, block, 0, stream>>>(geo, input, offset, mask, output, positions);
    };
    if (vec) {
      geo.points == 9 ? launch(IntC<kVec>{}, IntC<9>{}) : launch(IntC<kVec>{}, IntC<0>{});
    } else {
      geo.points == 9 ? launch(IntC<1>{}, IntC<9>{}) : launch(IntC<1>{}, IntC<0>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t, typename offset_t>
  static void legacy_backward(const Geometry& geo, const scalar_t* input, const offset_t* offset,
                              const offset_t* mask, const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input,
                              offset_t* grad_offset, offset_t* grad_mask) {
    const int64_t positions = geo.batch * geo.height_out * geo.width_out;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t lanes_total = positions * geo.group * geo.group_channels;
#define DCNV3_LANES_CASE(LANES)                                                                               \
  case LANES:                                                                                                 \
    legacy_backward_lanes_kernel<scalar_t, offset_t, LANES><<<blocks_for(lanes_total), kThreads, 0, stream>>>( \
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
        legacy_backward_kernel<scalar_t, offset_t><<<blocks_for(total), kThreads, 0, stream>>>(
            geo, input, offset, mask, grad_output, grad_input, grad_offset, grad_mask, total);
      }
    }
#undef DCNV3_LANES_CASE
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t, typename offset_t>
  static void backward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                       const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input, offset_t* grad_offset,
                       offset_t* grad_mask) {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = backward_vec<scalar_t>();
    const int64_t lanes = geo.group_channels / kVec;
    const bool chunked = !legacy_requested() && fits_int32(geo) && geo.group_channels % kVec == 0 &&
                         (lanes == 2 || lanes == 4 || lanes == 8 || lanes == 16) &&
                         aligned(input, kVec * sizeof(scalar_t)) && aligned(grad_output, kVec * sizeof(scalar_t)) &&
                         aligned(grad_input, kVec * sizeof(acc_t));
    if (!chunked) {
      legacy_backward<scalar_t, offset_t>(geo, input, offset, mask, grad_output, grad_input, grad_offset, grad_mask);
      return;
    }
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int positions = static_cast<int>(geo.batch * geo.height_out * geo.width_out);
    dim3 grid, block;
    chunked_launch_shape(geo, static_cast<int>(lanes), threads_for(sizeof(scalar_t), geo.group_channels, true), &grid,
                         &block);
    auto launch = [&](auto lanes_c) {
      constexpr int kLanes = decltype(lanes_c)::value;
      if (geo.points == 9) {
        backward_chunked_kernel<scalar_t, offset_t, kVec, kLanes, 9><<<grid, block, 0, stream>>>(
            geo, input, offset, mask, grad_output, grad_input, grad_offset, grad_mask, positions);
      } else {
        backward_chunked_kernel<scalar_t, offset_t, kVec, kLanes, 0><<<grid, block, 0, stream>>>(
            geo, input, offset, mask, grad_output, grad_input, grad_offset, grad_mask, positions);
      }
    };
    switch (lanes) {
      case 2: launch(IntC<2>{}); break;
      case 4: launch(IntC<4>{}); break;
      case 8: launch(IntC<8>{}); break;
      default: launch(IntC<16>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace cuda_impl

template <typename scalar_t, typename offset_t>
void CudaKernels::forward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                          scalar_t* output) {
  cuda_impl::Impl::forward<scalar_t, offset_t>(geo, input, offset, mask, output);
}

template <typename scalar_t, typename offset_t>
void CudaKernels::backward(const Geometry& geo, const scalar_t* input, const offset_t* offset, const offset_t* mask,
                           const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input, offset_t* grad_offset,
                           offset_t* grad_mask) {
  cuda_impl::Impl::backward<scalar_t, offset_t>(geo, input, offset, mask, grad_output, grad_input, grad_offset,
                                                grad_mask);
}

}  // namespace dcnv3

// Explicit instantiation of one (input dtype, offset dtype) pair's forward and backward.
#define DCNV3_CUDA_INSTANTIATE(S, O)                                                                               \
  template void dcnv3::CudaKernels::forward<S, O>(const dcnv3::Geometry&, const S*, const O*, const O*, S*);        \
  template void dcnv3::CudaKernels::backward<S, O>(const dcnv3::Geometry&, const S*, const O*, const O*, const S*, \
                                                   at::opmath_type<S>*, O*, O*);
