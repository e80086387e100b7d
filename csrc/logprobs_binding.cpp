// Registers the fused token log-prob kernels (logprobs_kernel.cu) as torch custom ops.
// Schemas here must match OP_SCHEMAS in hpalign/ops/cuda_ext.py (a CPU test checks it); the fake
// (meta) kernels and the autograd formula are registered from Python, in that file.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "logprobs_kernel.h"

namespace hpalign {
namespace {

LogitsDType to_logits_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return LogitsDType::kFloat32;
    case at::kBFloat16:
      return LogitsDType::kBFloat16;
    case at::kHalf:
      return LogitsDType::kFloat16;
    default:
      TORCH_CHECK(false, "hpalign token_logprobs: logits must be float32, bfloat16 or float16, got ",
                  logits.scalar_type());
  }
}

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda(), "hpalign token_logprobs: logits must be on a CUDA device");
  TORCH_CHECK(logits.dim() == 2, "hpalign token_logprobs: logits must be [N, V], got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, "hpalign token_logprobs: the vocabulary dimension V must be > 0");
  TORCH_CHECK(logits.is_contiguous(),
              "hpalign token_logprobs: logits must be contiguous (row-major [N, V]); call .contiguous()");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "hpalign token_logprobs: labels must be [N] with N = logits.size(0) = ", logits.size(0),
              ", got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "hpalign token_logprobs: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), "hpalign token_logprobs: labels are on ", labels.device(),
              " but logits on ", logits.device());
  to_logits_dtype(logits);
}

// A per-row float tensor [N] (lse, entropy, incoming gradients), as contiguous fp32.
at::Tensor row_vector(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "hpalign token_logprobs: ", name,
              " must be [N] with N = ", logits.size(0), ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), "hpalign token_logprobs: ", name, " is on ", t.device(),
              " but logits on ", logits.device());
  return t.to(at::kFloat).contiguous();
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "hpalign::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& labels,
                                                       bool with_entropy, const char* op) {
  check_logits_labels(logits, labels);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor labels_c = labels.contiguous();
  const auto fp32 = logits.options().dtype(at::kFloat);
  at::Tensor logps = at::empty({logits.size(0)}, fp32);
  at::Tensor lse = at::empty({logits.size(0)}, fp32);
  at::Tensor entropy = with_entropy ? at::empty({logits.size(0)}, fp32) : at::Tensor();
  check_launch(launch_token_logprobs_fwd(logits.data_ptr(), to_logits_dtype(logits), labels_c.data_ptr<int64_t>(),
                                         logits.size(0), logits.size(1), logps.data_ptr<float>(),
                                         lse.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr,
                                         c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return {logps, lse, entropy};
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels) {
  auto [logps, lse, entropy] = forward(logits, labels, /*with_entropy=*/false, "token_logprobs_fwd");
  return {logps, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_entropy_fwd(const at::Tensor& logits,
                                                                          const at::Tensor& labels) {
  return forward(logits, labels, /*with_entropy=*/true, "token_logprobs_entropy_fwd");
}

// Writes the gradient into `out` (a fresh tensor, or `logits` itself for the in-place op).
void backward_into(const at::Tensor& grad_logps, const at::Tensor& logits, const at::Tensor& labels,
                   const at::Tensor& lse, const std::optional<at::Tensor>& grad_entropy,
                   const std::optional<at::Tensor>& entropy, at::Tensor& out, const char* op) {
  check_logits_labels(logits, labels);
  TORCH_CHECK(grad_entropy.has_value() == entropy.has_value(), "hpalign::", op,
              ": pass both grad_entropy and entropy, or neither");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor labels_c = labels.contiguous();
  const at::Tensor grad_c = row_vector(grad_logps, "grad_logps", logits);
  const at::Tensor lse_c = row_vector(lse, "lse", logits);
  at::Tensor grad_entropy_c;
  at::Tensor entropy_c;
  if (entropy.has_value()) {
    grad_entropy_c = row_vector(*grad_entropy, "grad_entropy", logits);
    entropy_c = row_vector(*entropy, "entropy", logits);
  }
  check_launch(launch_token_logprobs_bwd(grad_c.data_ptr<float>(),
                                         entropy.has_value() ? grad_entropy_c.data_ptr<float>() : nullptr,
                                         logits.data_ptr(), to_logits_dtype(logits), labels_c.data_ptr<int64_t>(),
                                         lse_c.data_ptr<float>(),
                                         entropy.has_value() ? entropy_c.data_ptr<float>() : nullptr,
                                         logits.size(0), logits.size(1), out.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream().stream()),
               op);
}

at::Tensor token_logprobs_bwd(const at::Tensor& grad_logps, const at::Tensor& logits, const at::Tensor& labels,
                              const at::Tensor& lse, const std::optional<at::Tensor>& grad_entropy,
                              const std::optional<at::Tensor>& entropy) {
  // Same dtype as the logits: a bf16 model never sees an fp32 [N, V] buffer here.
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  backward_into(grad_logps, logits, labels, lse, grad_entropy, entropy, grad_logits, "token_logprobs_bwd");
  return grad_logits;
}

void token_logprobs_bwd_inplace(const at::Tensor& grad_logps, at::Tensor& logits, const at::Tensor& labels,
                                const at::Tensor& lse, const std::optional<at::Tensor>& grad_entropy,
                                const std::optional<at::Tensor>& entropy) {
  backward_into(grad_logps, logits, labels, lse, grad_entropy, entropy, logits, "token_logprobs_bwd_inplace");
}

}  // namespace
}  // namespace hpalign

TORCH_LIBRARY(hpalign, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels) -> (Tensor logps, Tensor lse)");
  m.def("token_logprobs_entropy_fwd(Tensor logits, Tensor labels) -> (Tensor logps, Tensor lse, Tensor entropy)");
  m.def(
      "token_logprobs_bwd(Tensor grad_logps, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor? grad_entropy=None, Tensor? entropy=None) -> Tensor");
  m.def(
      "token_logprobs_bwd_inplace(Tensor grad_logps, Tensor(a!) logits, Tensor labels, Tensor lse, "
      "Tensor? grad_entropy=None, Tensor? entropy=None) -> ()");
}

TORCH_LIBRARY_IMPL(hpalign, CUDA, m) {
  m.impl("token_logprobs_fwd", &hpalign::token_logprobs_fwd);
  m.impl("token_logprobs_entropy_fwd", &hpalign::token_logprobs_entropy_fwd);
  m.impl("token_logprobs_bwd", &hpalign::token_logprobs_bwd);
  m.impl("token_logprobs_bwd_inplace", &hpalign::token_logprobs_bwd_inplace);
}
