// The CPU kernels of the three ops (one source file each), for ops.cpp: inputs contiguous, of
// one floating dtype and checked against the plan (shapes consistent, the window fits).
#pragma once

#include "plan.h"

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

namespace tokenmix_cpu {

// The argument checks of the ops' entry points (ops.cpp), one-line ValueError/TypeError naming
// the argument: a forced backend other than "cpu" (`function`: the tokenmix.ops function to
// name instead of `op`), a tensor's dimension, device and floating dtype, two tensors' dtypes.
void check_backend(const char* op, const std::optional<c10::string_view>& backend, const char* function = nullptr);
void check_tensor(const char* name, const at::Tensor& t, int64_t dim, const char* layout);
void check_same_dtype(const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b);

at::Tensor aggregate(const at::Tensor& x, const at::Tensor& w, const Plan& plan);

at::Tensor correlate(const at::Tensor& q, const at::Tensor& k, const Plan& plan, int64_t groups, bool sum_batch,
                     bool sum_space);

at::Tensor aggregate_transpose(const at::Tensor& y, const at::Tensor& w, const Plan& plan);

// aggregate_transpose at column stride 1 with a zero border: an aggregate of y over the
// mirrored window (Plan::mirrored) with each weight taken at the source pixel its tap reads.
at::Tensor aggregate_source_weights(const at::Tensor& y, const at::Tensor& w, const Plan& mirrored);

// The three ops from the plan's tables alone, with no scratch (tables.cpp): the kernels of the
// plans whose window reaches far past the image along a row (Plan::bounded_layout false).
at::Tensor aggregate_tables(const at::Tensor& x, const at::Tensor& w, const Plan& plan);
at::Tensor correlate_tables(const at::Tensor& q, const at::Tensor& k, const Plan& plan, int64_t groups,
                            bool sum_batch, bool sum_space);
at::Tensor aggregate_transpose_tables(const at::Tensor& y, const at::Tensor& w, const Plan& plan);

#ifdef TOKENMIX_TEST_HOOKS
// Forces how many of correlate's last planes lend their memory as scratch (n >= 0; -1: the
// kernel's own sizing); returns the previous setting.
int64_t lent_planes_override(int64_t n);
#endif

}  // namespace tokenmix_cpu
