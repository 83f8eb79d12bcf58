// DCNv3 sampling math, written once for host and device code.
//
// Layouts (NHWC, as the official InternImage release):
//   input  (N, H_in, W_in, G*D)       output (N, H_out, W_out, G*D)
//   offset (N, H_out, W_out, G*P*2)   channel (g*P + p)*2 + {0: x, 1: y}, in pixels
//   mask   (N, H_out, W_out, G*P)     channel g*P + p
// Points are x-major (p = i_x * kernel_h + i_y), the centre skipped when remove_center. offset_scale multiplies the
// regular kernel grid and the learned offsets. Bilinear sampling reads zeros outside the image, exactly as
// grid_sample(align_corners=False, padding_mode='zeros') does on pixel coordinates.
//
// The CPU kernel (dcnv3_cpu.cpp) and the CUDA kernel (dcnv3_cuda_kernels.cuh) differ only in how they map work to
// threads and how they add into grad_input; everything numerical lives here, so the CPU tests exercise the GPU's math too.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCNV3_HD __host__ __device__ __forceinline__
#define DCNV3_FLOOR ::floor
#else
#define DCNV3_HD inline
#define DCNV3_FLOOR std::floor
#endif

namespace dcnv3 {

struct Geometry {
  int64_t batch, height_in, width_in, height_out, width_out;
  int64_t group, group_channels, points;  // channels = group * group_channels
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool remove_center;
  float offset_scale;

  DCNV3_HD int64_t channels() const { return group * group_channels; }
};

// Regular grid position (before offsets) of kernel point p, in pixels relative to the output's centre tap.
// index_t: int64_t on the host; the CUDA kernel passes int32 (its host side checks that every index fits).
template <typename index_t>
DCNV3_HD void kernel_point(const Geometry& geo, index_t p, int* i_x, int* i_y) {
  if (geo.remove_center && p >= static_cast<index_t>(geo.points / 2)) ++p;  // skip the centre tap (odd kernels only)
  *i_x = static_cast<int>(p / geo.kernel_h);
  *i_y = static_cast<int>(p % geo.kernel_h);
}

// Sampling location (pixel coordinates in the unpadded input) of point p at output (h_out, w_out).
template <typename acc_t, typename index_t>
DCNV3_HD void sampling_location(const Geometry& geo, index_t h_out, index_t w_out, index_t p, acc_t off_x,
                                acc_t off_y, acc_t* loc_h, acc_t* loc_w) {
  int i_x, i_y;
  kernel_point<index_t>(geo, p, &i_x, &i_y);
  const int center_h = geo.dilation_h * (geo.kernel_h - 1) / 2;
  const int center_w = geo.dilation_w * (geo.kernel_w - 1) / 2;
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  const acc_t base_h = static_cast<acc_t>(h_out * geo.stride_h - geo.pad_h + center_h);
  const acc_t base_w = static_cast<acc_t>(w_out * geo.stride_w - geo.pad_w + center_w);
  *loc_h = base_h + (static_cast<acc_t>(i_y * geo.dilation_h - center_h) + off_y) * scale;
  *loc_w = base_w + (static_cast<acc_t>(i_x * geo.dilation_w - center_w) + off_x) * scale;
}

// The four bilinear taps of one sampling location: pixel indices (h * W + w) and weights, with the weights' partial
// derivatives in h and w. Taps outside the image get weight 0 and index 0, so callers never branch per channel.
// index_t: int64_t on the host, int32 in the CUDA kernel (pixel indices of one image).
template <typename acc_t, typename index_t = int64_t>
struct Taps {
  index_t index[4];
  acc_t weight[4];
  acc_t dweight_dh[4];
  acc_t dweight_dw[4];
  bool inside[4];  // tap k lies in the image (its weight may still be 0 on a pixel boundary)
  bool any;        // false when every tap is outside the image
};

template <typename acc_t, typename index_t = int64_t>
DCNV3_HD Taps<acc_t, index_t> bilinear_taps(acc_t loc_h, acc_t loc_w, index_t height, index_t width) {
  Taps<acc_t, index_t> t;
  // Some tap is inside iff floor(loc) lies in [-1, size - 1] on both axes. Testing that first keeps far-away (or NaN)
  // locations from overflowing the integer conversion and costs nothing when most points fall outside.
  if (!(loc_h >= acc_t(-1) && loc_h < static_cast<acc_t>(height) && loc_w >= acc_t(-1) &&
        loc_w < static_cast<acc_t>(width))) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      t.index[k] = 0;
      t.weight[k] = t.dweight_dh[k] = t.dweight_dw[k] = acc_t(0);
      t.inside[k] = false;
    }
    t.any = false;
    return t;
  }
  const acc_t fh = DCNV3_FLOOR(loc_h), fw = DCNV3_FLOOR(loc_w);
  const index_t h0 = static_cast<index_t>(fh), w0 = static_cast<index_t>(fw);
  const acc_t lh = loc_h - fh, lw = loc_w - fw;
  const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
  const index_t hs[4] = {h0, h0, h0 + 1, h0 + 1};
  const index_t ws[4] = {w0, w0 + 1, w0, w0 + 1};
  const acc_t wv[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
  const acc_t dh[4] = {-hw, -lw, hw, lw};
  const acc_t dw[4] = {-hh, hh, -lh, lh};
  t.any = false;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const bool inside = hs[k] >= 0 && hs[k] < height && ws[k] >= 0 && ws[k] < width;
    t.index[k] = inside ? hs[k] * width + ws[k] : 0;
    t.weight[k] = inside ? wv[k] : acc_t(0);
    t.dweight_dh[k] = inside ? dh[k] : acc_t(0);
    t.dweight_dw[k] = inside ? dw[k] : acc_t(0);
    t.inside[k] = inside;
    t.any = t.any || inside;
  }
  return t;
}

template <typename T>
DCNV3_HD float to_acc(T v) { return static_cast<float>(v); }
DCNV3_HD double to_acc(double v) { return v; }

// Interpolated value of channel c (data points at the group's first channel of pixel 0, pixels pixel_stride apart).
template <typename scalar_t, typename acc_t>
DCNV3_HD acc_t sample(const scalar_t* data, int64_t pixel_stride, const Taps<acc_t>& t, int64_t c) {
  return t.weight[0] * static_cast<acc_t>(to_acc(data[t.index[0] * pixel_stride + c])) +
         t.weight[1] * static_cast<acc_t>(to_acc(data[t.index[1] * pixel_stride + c])) +
         t.weight[2] * static_cast<acc_t>(to_acc(data[t.index[2] * pixel_stride + c])) +
         t.weight[3] * static_cast<acc_t>(to_acc(data[t.index[3] * pixel_stride + c]));
}

// Adds into grad_input on the host: the caller guarantees that no other thread writes the same slice.
struct PlainAdd {
  template <typename T>
  DCNV3_HD static void apply(T* address, T value) { *address += value; }
};

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCNV3_SIMD_REDUCE
#else
#define DCNV3_SIMD_REDUCE _Pragma("omp simd reduction(+ : g_mask, g_h, g_w)")
#endif

// Backward of one (output position, group, point) over the group's channels [0, D):
//   grad_input[tap] += weight[tap] * mask * grad_out[c]           (through Add::apply; taps outside add zero)
//   grad_mask        = sum_c grad_out[c] * sample[c]
//   grad_offset_xy   = mask * offset_scale * sum_c grad_out[c] * d sample[c] / d(w, h)
// data and grad_input point at the group's first channel of pixel 0 of this image; pixels are pixel_stride apart.
// Two taps may share a pixel row (only when both are outside, weight 0) but rows never partly overlap, which keeps
// the vectorised host loop exact.
// kChannels > 0 fixes group_channels at compile time (fully unrolled, fixed-width vector code on the host).
template <typename scalar_t, typename acc_t, typename Add, int kChannels = 0>
DCNV3_HD void point_backward(const scalar_t* data, acc_t* grad_input, int64_t pixel_stride, const scalar_t* grad_out,
                             int64_t group_channels, const Taps<acc_t>& t, acc_t mask, acc_t offset_scale,
                             acc_t* grad_mask, acc_t* grad_off_x, acc_t* grad_off_y) {
  const int64_t channels = kChannels > 0 ? kChannels : group_channels;
  const scalar_t* v0 = data + t.index[0] * pixel_stride;
  const scalar_t* v1 = data + t.index[1] * pixel_stride;
  const scalar_t* v2 = data + t.index[2] * pixel_stride;
  const scalar_t* v3 = data + t.index[3] * pixel_stride;
  acc_t* g0 = grad_input + t.index[0] * pixel_stride;
  acc_t* g1 = grad_input + t.index[1] * pixel_stride;
  acc_t* g2 = grad_input + t.index[2] * pixel_stride;
  acc_t* g3 = grad_input + t.index[3] * pixel_stride;
  const acc_t w0 = t.weight[0], w1 = t.weight[1], w2 = t.weight[2], w3 = t.weight[3];
  const acc_t h0 = t.dweight_dh[0], h1 = t.dweight_dh[1], h2 = t.dweight_dh[2], h3 = t.dweight_dh[3];
  const acc_t x0 = t.dweight_dw[0], x1 = t.dweight_dw[1], x2 = t.dweight_dw[2], x3 = t.dweight_dw[3];
  const acc_t mw0 = w0 * mask, mw1 = w1 * mask, mw2 = w2 * mask, mw3 = w3 * mask;
  acc_t g_mask = 0, g_h = 0, g_w = 0;
  DCNV3_SIMD_REDUCE
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t go = static_cast<acc_t>(to_acc(grad_out[c]));
    const acc_t a = static_cast<acc_t>(to_acc(v0[c])), b = static_cast<acc_t>(to_acc(v1[c]));
    const acc_t d = static_cast<acc_t>(to_acc(v2[c])), e = static_cast<acc_t>(to_acc(v3[c]));
    g_mask += go * (w0 * a + w1 * b + w2 * d + w3 * e);
    g_h += go * (h0 * a + h1 * b + h2 * d + h3 * e);
    g_w += go * (x0 * a + x1 * b + x2 * d + x3 * e);
    Add::apply(g0 + c, mw0 * go);
    Add::apply(g1 + c, mw1 * go);
    Add::apply(g2 + c, mw2 * go);
    Add::apply(g3 + c, mw3 * go);
  }
  *grad_mask = g_mask;
  *grad_off_x = g_w * mask * offset_scale;
  *grad_off_y = g_h * mask * offset_scale;
}

}  // namespace dcnv3
