// PyTorch binding of the CUDA log-prob kernels (logprob_cuda.cu): input checks, output
// allocation, the current stream and device, and registration as torch.ops.at_logprob_cuda
// (the same schema as the CPU kernel's torch.ops.at_logprob_cpu).

#include "logprob_cuda.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace {

at_logprob::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return at_logprob::DType::kFloat32;
    case at::kDouble: return at_logprob::DType::kFloat64;
    case at::kBFloat16: return at_logprob::DType::kBFloat16;
    case at::kHalf: return at_logprob::DType::kFloat16;
    default: TORCH_CHECK(false, "token_logprobs (cuda): unsupported logits dtype ", t.scalar_type());
  }
}

at::ScalarType acc_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  TORCH_CHECK(logits.is_cuda() && targets.is_cuda() && logits.device() == targets.device(),
              "token_logprobs (cuda): logits and targets must be on the same CUDA device");
  TORCH_CHECK(logits.dim() == 2, "token_logprobs: logits must be [T, V], got shape ",
              logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "token_logprobs: logits rows must be contiguous");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                  targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "token_logprobs: targets must be a contiguous int64 [T] tensor matching logits");
  TORCH_CHECK(temperature > 0, "token_logprobs: temperature must be > 0, got ", temperature);
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0, "token_logprobs: empty vocabulary");
  TORCH_CHECK(logits.size(0) < (int64_t{1} << 31), "token_logprobs (cuda): too many rows");
}

void check_row_stat(const at::Tensor& t, const at::Tensor& logits, const char* what) {
  TORCH_CHECK(t.numel() == logits.size(0) && t.is_contiguous() &&
                  t.scalar_type() == acc_of(logits) && t.device() == logits.device(),
              "token_logprobs backward: ", what, " must be a contiguous [T] ", acc_of(logits),
              " tensor on ", logits.device());
}

at_logprob::Rows rows_of(const at::Tensor& logits, const at::Tensor& targets,
                         double temperature) {
  return {logits.data_ptr(), logits.stride(0), logits.size(0), logits.size(1),
          targets.const_data_ptr<int64_t>(), temperature};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits,
                                                            const at::Tensor& targets,
                                                            double temperature,
                                                            bool with_entropy) {
  check_inputs(logits, targets, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  const auto opts = logits.options().dtype(acc_of(logits));
  at::Tensor lp = at::empty({rows}, opts), lse = at::empty({rows}, opts);
  at::Tensor ent = at::empty({with_entropy ? rows : 0}, opts);
  const cudaError_t err = at_logprob::launch_forward(
      dtype_of(logits), rows_of(logits, targets, temperature), lp.data_ptr(), lse.data_ptr(),
      with_entropy ? ent.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "token_logprobs forward (cuda): ", cudaGetErrorString(err));
  return {lp, lse, ent};
}

void backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& ent, const at::Tensor& grad_lp, const at::Tensor& grad_ent,
                   double temperature, at::Tensor grad_logits) {
  check_inputs(logits, targets, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.stride(1) == 1 &&
                  grad_logits.scalar_type() == logits.scalar_type() &&
                  grad_logits.device() == logits.device(),
              "token_logprobs backward: grad_logits must match logits");
  check_row_stat(lse, logits, "lse");
  check_row_stat(grad_lp, logits, "grad_logprobs");
  const bool with_entropy = grad_ent.numel() > 0;
  if (with_entropy) {
    check_row_stat(ent, logits, "entropy");
    check_row_stat(grad_ent, logits, "grad_entropy");
  }
  const cudaError_t err = at_logprob::launch_backward(
      dtype_of(logits), rows_of(logits, targets, temperature), grad_logits.data_ptr(),
      grad_logits.stride(0), lse.data_ptr(), with_entropy ? ent.data_ptr() : nullptr,
      grad_lp.data_ptr(), with_entropy ? grad_ent.data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "token_logprobs backward (cuda): ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY(at_logprob_cuda, m) {
  m.def(
      "forward(Tensor logits, Tensor targets, float temperature, bool with_entropy)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor logits, Tensor targets, Tensor lse, Tensor entropy, Tensor grad_logprobs,"
      " Tensor grad_entropy, float temperature, Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(at_logprob_cuda, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}
