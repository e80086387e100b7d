// Fused per-token log-probabilities: the launch API between the CUDA kernels
// (logprobs_kernel.cu, no torch headers) and their torch registration
// (logprobs_binding.cpp). Plain pointers and sizes only, so the kernel file
// compiles with bare nvcc and the binding with any host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace hpalign {

enum class LogitsDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Rows whose label equals this are ignored: logp = lse = entropy = 0, zero gradient.
constexpr int64_t kIgnoreIndex = -100;

// Forward, one pass over each row of logits [N, V] (row-major, contiguous):
//   lse[n]     = log sum_v exp(logits[n, v])                      (fp32)
//   logps[n]   = logits[n, labels[n]] - lse[n]                    (fp32)
//   entropy[n] = lse[n] - sum_v softmax(logits[n])_v logits[n, v] (fp32; skipped when nullptr)
// A label outside [0, V) that is not kIgnoreIndex gives logps[n] = NaN.
cudaError_t launch_token_logprobs_fwd(const void* logits, LogitsDType dtype, const int64_t* labels,
                                      int64_t num_rows, int64_t vocab, float* logps, float* lse,
                                      float* entropy, cudaStream_t stream);

// Backward, one read of the logits and one write of the gradient (same dtype as the logits):
//   grad[n, v] = grad_logps[n] * (onehot(v == labels[n]) - p[n, v])
//              - grad_entropy[n] * p[n, v] * (logits[n, v] - lse[n] + entropy[n])
// with p = exp(logits - lse). grad_entropy and entropy are both nullptr or both set.
// grad_logits may equal logits (in place): every element is read before it is written,
// by the same thread.
cudaError_t launch_token_logprobs_bwd(const float* grad_logps, const float* grad_entropy,
                                      const void* logits, LogitsDType dtype, const int64_t* labels,
                                      const float* lse, const float* entropy, int64_t num_rows,
                                      int64_t vocab, void* grad_logits, cudaStream_t stream);

}  // namespace hpalign
