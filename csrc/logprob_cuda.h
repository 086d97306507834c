// Interface between the CUDA log-prob kernels (logprob_cuda.cu, which needs only the CUDA
// toolkit) and their PyTorch binding (logprob_cuda_ops.cpp). Keeping torch's headers out of
// the .cu keeps nvcc fast and lets CI compile the kernels without a CUDA build of torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace at_logprob {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// `rows` rows of `V` logits, row i at x + i * ld (elements); targets: int64 [rows].
struct Rows {
  const void* x;
  int64_t ld;
  int64_t rows;
  int64_t V;
  const int64_t* targets;
  double temperature;
};

// Per-row outputs (fp32, or fp64 for fp64 logits): logprob, log-sum-exp, and the entropy
// when `ent` is non-null.
cudaError_t launch_forward(DType dtype, const Rows& in, void* lp, void* lse, void* ent,
                           cudaStream_t stream);

// grad_logits (logits' dtype, row i at gx + i * gld; may equal in.x) from the per-row
// statistics and upstream gradients; `ent`/`grad_ent` null means no entropy term.
cudaError_t launch_backward(DType dtype, const Rows& in, void* gx, int64_t gld, const void* lse,
                            const void* ent, const void* grad_lp, const void* grad_ent,
                            cudaStream_t stream);

}  // namespace at_logprob
