// Argument checks of the FCN decoder ops (upsample_add, deconv_add), shared by the CPU and
// CUDA registrations. The Python layer (fastseg/ops) checks user input with friendlier
// messages; these guard direct torch.ops.fastseg calls so that no kernel reads out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastseg {

// The memory format every kernel writes: channels_last when the reference tensor is
// channels_last-contiguous and not contiguous (the same rule as fastseg/ops/_checks.py).
inline at::MemoryFormat output_memory_format(const at::Tensor& reference) {
  return reference.is_contiguous(at::MemoryFormat::ChannelsLast) && !reference.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t minimum) {
  TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= minimum && v[1] >= minimum, op, ": ", name,
                    " must be two values >= ", minimum, ", got ", v);
}

inline void check_scores(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                   t.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}

// x (N, C, Hi, Wi) and the optional skip window skip[:, :, oy:oy + Ho, ox:ox + Wo].
inline void check_decoder_inputs(const char* op, const at::Tensor& x,
                                 const std::optional<at::Tensor>& skip,
                                 at::IntArrayRef skip_offset, at::IntArrayRef output_size) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(2) > 0 && x.size(3) > 0, op,
                    ": x must be (N, C, H, W) with H, W > 0, got ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
                   x.scalar_type());
  check_pair(op, "skip_offset", skip_offset, 0);
  check_pair(op, "output_size", output_size, 1);
  if (skip) {
    check_scores(op, "skip", *skip, x);
    TORCH_CHECK_VALUE(skip->size(0) == x.size(0) && skip->size(1) == x.size(1), op,
                      ": skip must have x's (N, C) = (", x.size(0), ", ", x.size(1), "), got ",
                      skip->sizes());
    TORCH_CHECK_VALUE(skip->size(2) >= skip_offset[0] + output_size[0] &&
                          skip->size(3) >= skip_offset[1] + output_size[1],
                      op, ": skip ", skip->sizes(), " is too small for an output of ", output_size,
                      " at skip_offset ", skip_offset);
  }
}

inline void check_deconv_weight(const char* op, const at::Tensor& weight, const at::Tensor& x,
                                at::IntArrayRef stride, at::IntArrayRef crop) {
  check_scores(op, "weight", weight, x);
  TORCH_CHECK_VALUE(weight.size(0) == x.size(1) && weight.size(1) == 1 && weight.size(2) > 0 &&
                        weight.size(3) > 0 && weight.is_contiguous(),
                    op, ": weight must be a contiguous depthwise (", x.size(1),
                    ", 1, kh, kw) tensor, got ", weight.sizes());
  check_pair(op, "stride", stride, 1);
  check_pair(op, "crop", crop, 0);
}

// The full (uncropped) transposed-convolution size along one axis.
inline int64_t deconv_full_size(int64_t in, int64_t stride, int64_t k) {
  return (in - 1) * stride + k;
}

inline void check_deconv_window(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef crop,
                                at::IntArrayRef output_size) {
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t full = deconv_full_size(x.size(2 + axis), stride[axis], weight.size(2 + axis));
    TORCH_CHECK_VALUE(crop[axis] + output_size[axis] <= full, op, ": output_size ", output_size,
                      " at crop ", crop, " does not fit in the deconvolution of x ", x.sizes(),
                      " (axis ", axis, ": ", full, ")");
  }
}

}  // namespace fastseg
