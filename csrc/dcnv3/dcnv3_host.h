// Host side shared by the CPU and CUDA extensions: argument checks, geometry, output allocation, dtype dispatch and
// the Python bindings. Each extension supplies only a Kernels type with
//   static auto enter(input)   checks the device and returns a guard held during the launch
//   template <scalar_t, offset_t> static void forward(geo, input, offset, mask, output)
//   template <scalar_t, offset_t> static void backward(geo, input, offset, mask, grad_output, grad_input_acc,
//                                                      grad_offset, grad_mask)
// where grad_input_acc is zero-initialised opmath (float32 for half/bfloat16) memory the kernel adds into.
#pragma once

#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <vector>

#include "dcnv3_math.h"

namespace dcnv3 {

inline int64_t out_size(int64_t in, int kernel, int stride, int pad, int dilation) {
  return (in + 2 * pad - (dilation * (kernel - 1) + 1)) / stride + 1;
}

// Validates shapes, dtypes and devices; returns the geometry. Messages name the argument at fault.
inline Geometry make_geometry(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, int kernel_h,
                              int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                              int dilation_w, int64_t group, int64_t group_channels, double offset_scale,
                              bool remove_center) {
  TORCH_CHECK(input.dim() == 4, "dcnv3: input must be NHWC (N, H, W, C), got shape ", input.sizes());
  TORCH_CHECK(offset.dim() == 4 && mask.dim() == 4, "dcnv3: offset and mask must be NHWC, got ", offset.sizes(),
              " and ", mask.sizes());
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0 && stride_h > 0 && stride_w > 0 && dilation_h > 0 && dilation_w > 0 &&
                  pad_h >= 0 && pad_w >= 0,
              "dcnv3: kernel, stride and dilation must be positive and padding non-negative");
  TORCH_CHECK(!remove_center || (kernel_h % 2 == 1 && kernel_w % 2 == 1),
              "dcnv3: remove_center needs an odd kernel, got ", kernel_h, "x", kernel_w);
  TORCH_CHECK(group > 0 && group_channels > 0 && input.size(3) == group * group_channels, "dcnv3: input has ",
              input.size(3), " channels but group * group_channels = ", group, " * ", group_channels);
  TORCH_CHECK(input.device() == offset.device() && input.device() == mask.device(),
              "dcnv3: input, offset and mask must be on one device");
  TORCH_CHECK(offset.scalar_type() == mask.scalar_type(), "dcnv3: offset (", offset.scalar_type(), ") and mask (",
              mask.scalar_type(), ") must have one dtype");
  TORCH_CHECK(offset.scalar_type() == input.scalar_type() || offset.scalar_type() == at::kFloat,
              "dcnv3: offset and mask must have the input's dtype (", input.scalar_type(), ") or float32, got ",
              offset.scalar_type());
  Geometry g;
  g.batch = input.size(0);
  g.height_in = input.size(1);
  g.width_in = input.size(2);
  g.height_out = out_size(g.height_in, kernel_h, stride_h, pad_h, dilation_h);
  g.width_out = out_size(g.width_in, kernel_w, stride_w, pad_w, dilation_w);
  g.group = group;
  g.group_channels = group_channels;
  g.points = static_cast<int64_t>(kernel_h) * kernel_w - (remove_center ? 1 : 0);
  g.kernel_h = kernel_h;
  g.kernel_w = kernel_w;
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dilation_h = dilation_h;
  g.dilation_w = dilation_w;
  g.remove_center = remove_center;
  g.offset_scale = static_cast<float>(offset_scale);
  TORCH_CHECK(g.height_out > 0 && g.width_out > 0, "dcnv3: empty output for input ", input.sizes());
  const std::vector<int64_t> want_offset{g.batch, g.height_out, g.width_out, group * g.points * 2};
  const std::vector<int64_t> want_mask{g.batch, g.height_out, g.width_out, group * g.points};
  TORCH_CHECK(offset.sizes() == at::IntArrayRef(want_offset), "dcnv3: offset must have shape ", want_offset, ", got ",
              offset.sizes());
  TORCH_CHECK(mask.sizes() == at::IntArrayRef(want_mask), "dcnv3: mask must have shape ", want_mask, ", got ",
              mask.sizes());
  return g;
}

// Calls the lambda (the variadic argument, so that template commas pass) with scalar_t (the input's dtype) and offset_t (offset and mask: the input's dtype or float32).
#define DCNV3_DISPATCH(INPUT, OFFSET, NAME, ...)                                                        \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (INPUT).scalar_type(), NAME, [&] {         \
    if ((OFFSET).scalar_type() == (INPUT).scalar_type()) {                                              \
      using offset_t = scalar_t;                                                                        \
      __VA_ARGS__();                                                                                    \
    } else {                                                                                            \
      using offset_t = float;                                                                           \
      __VA_ARGS__();                                                                                    \
    }                                                                                                   \
  })

template <typename Kernels>
at::Tensor forward(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_, int kernel_h,
                   int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w,
                   int64_t group, int64_t group_channels, double offset_scale, bool remove_center) {
  const Geometry geo = make_geometry(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                     dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
  const auto device_guard = Kernels::enter(input_);  // checks the device, makes it current for the launch
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  at::Tensor output = at::empty({geo.batch, geo.height_out, geo.width_out, geo.channels()}, input.options());
  if (output.numel() == 0) return output;
  DCNV3_DISPATCH(input, offset, "dcnv3_forward", [&] {
    Kernels::template forward<scalar_t, offset_t>(geo, input.const_data_ptr<scalar_t>(),
                                                  offset.const_data_ptr<offset_t>(), mask.const_data_ptr<offset_t>(),
                                                  output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

template <typename Kernels>
std::vector<at::Tensor> backward(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                                 int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w,
                                 int dilation_h, int dilation_w, int64_t group, int64_t group_channels,
                                 double offset_scale, bool remove_center, const at::Tensor& grad_output_) {
  const Geometry geo = make_geometry(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                     dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
  const auto device_guard = Kernels::enter(input_);  // checks the device, makes it current for the launch
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  const at::Tensor grad_output = grad_output_.to(input.scalar_type()).contiguous();
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({geo.batch, geo.height_out, geo.width_out, geo.channels()}),
              "dcnv3 backward: grad_output has shape ", grad_output.sizes());
  const bool reduced = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  // Low-precision inputs scatter into a float32 buffer, cast once at the end.
  at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(reduced ? at::kFloat : input.scalar_type()));
  at::Tensor grad_offset = at::zeros_like(offset), grad_mask = at::zeros_like(mask);
  if (input.numel() > 0 && grad_output.numel() > 0) {
    DCNV3_DISPATCH(input, offset, "dcnv3_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      Kernels::template backward<scalar_t, offset_t>(
          geo, input.const_data_ptr<scalar_t>(), offset.const_data_ptr<offset_t>(), mask.const_data_ptr<offset_t>(),
          grad_output.const_data_ptr<scalar_t>(), grad_input_acc.mutable_data_ptr<acc_t>(),
          grad_offset.mutable_data_ptr<offset_t>(), grad_mask.mutable_data_ptr<offset_t>());
    });
  }
  return {reduced ? grad_input_acc.to(input.scalar_type()) : grad_input_acc, grad_offset, grad_mask};
}

}  // namespace dcnv3

#define DCNV3_BIND(KERNELS, DOC)                                                                          \
  PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {                                                              \
    m.doc() = DOC;                                                                                        \
    m.def("forward", &dcnv3::forward<KERNELS>, "DCNv3 forward: output (N, H_out, W_out, G*D)");          \
    m.def("backward", &dcnv3::backward<KERNELS>, "DCNv3 backward: grad_input, grad_offset, grad_mask");   \
  }
