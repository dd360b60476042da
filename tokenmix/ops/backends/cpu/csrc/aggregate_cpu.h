// The three CPU kernels of aggregate_cpu.cpp, for autograd_cpu.cpp. Arguments as the
// torch.ops.tokenmix_cpu ops of the same names (see the geometry notes in aggregate_cpu.cpp);
// inputs must be contiguous and of one dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tokenmix_cpu {

at::Tensor aggregate(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rows, const at::Tensor& cols,
                     const at::Tensor& coff, int64_t s, int64_t fa, int64_t fb, bool pad_ok);

at::Tensor correlate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& rows, const at::Tensor& cols,
                     const at::Tensor& coff, int64_t s, int64_t fa, int64_t fb, bool pad_ok, int64_t groups,
                     bool sum_batch, bool sum_space);

at::Tensor aggregate_transpose(const at::Tensor& y, const at::Tensor& w, const at::Tensor& rows,
                               const at::Tensor& cols, const at::Tensor& coff, int64_t s, bool pad_ok, int64_t ca,
                               int64_t cb, const at::Tensor& rptr, const at::Tensor& rpair, const at::Tensor& cptr,
                               const at::Tensor& cpair, int64_t H, int64_t W);

}  // namespace tokenmix_cpu
