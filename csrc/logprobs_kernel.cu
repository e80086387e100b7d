// Fused per-token log-probabilities for logits [N, V] (fp32 / bf16 / fp16) and labels [N] int64.
//
// Forward: one block per row, a single pass over the row with an online log-sum-exp (running max,
// running sum rescaled when the max grows, fp32 accumulation), 16-byte loads for the aligned body
// of the row. Saves lse[n] so that the backward needs one more read of the logits and no softmax
// buffer. The optional entropy is accumulated in the same pass.
// Backward: grad = g * (onehot - p) [- g_H * p * (logit - lse + H)], p = exp(logit - lse), one read
// of the logits and one write in the logits' dtype, possibly into the logits buffer itself.
//
// No torch headers here on purpose: the registration lives in logprobs_binding.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "logprobs_kernel.h"

namespace hpalign {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;  // one 128-bit load per thread and step
constexpr int kUnroll = 4;     // loads in flight per thread before any maths

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Online log-sum-exp state over the values seen so far:
//   m = max x,  s = sum exp(x - m),  t = sum exp(x - m) * (x - m)  (t only for the entropy).
// t is kept relative to m so that H = log(s) - t / s adds two non-negative terms instead of
// cancelling lse against sum p*x.
struct LseState {
  float m;
  float s;
  float t;
};

__device__ __forceinline__ LseState empty_state() { return {-INFINITY, 0.f, 0.f}; }

// Move the reference point of the state to new_m >= st.m.
template <bool kEntropy>
__device__ __forceinline__ void rescale(LseState& st, float new_m) {
  if (new_m == st.m) return;  // also the all -inf case, where new_m - st.m would be NaN
  if (st.m == -INFINITY) {    // nothing accumulated yet: s = t = 0
    st.m = new_m;
    return;
  }
  const float shift = st.m - new_m;  // < 0
  const float scale = __expf(shift);
  if (kEntropy) st.t = scale * (st.t + st.s * shift);
  st.s *= scale;
  st.m = new_m;
}

// Add values to the state: one rescale per vector, then one exp per value.
template <bool kEntropy, int K>
__device__ __forceinline__ void update(LseState& st, const float (&x)[K]) {
  float x_max = x[0];
#pragma unroll
  for (int k = 1; k < K; ++k) x_max = fmaxf(x_max, x[k]);
  rescale<kEntropy>(st, fmaxf(st.m, x_max));
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (x[k] == -INFINITY) continue;  // contributes 0; avoids 0 * -inf in t and -inf - -inf
    const float d = x[k] - st.m;      // <= 0
    const float e = __expf(d);
    st.s += e;
    if (kEntropy) st.t += e * d;
  }
}

template <bool kEntropy>
__device__ __forceinline__ LseState merge(LseState a, LseState b) {
  const float m = fmaxf(a.m, b.m);
  rescale<kEntropy>(a, m);
  rescale<kEntropy>(b, m);
  return {m, a.s + b.s, a.t + b.t};
}

template <bool kEntropy>
__device__ __forceinline__ LseState warp_reduce(LseState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    LseState other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.t = kEntropy ? __shfl_xor_sync(0xffffffffu, st.t, offset) : 0.f;
    st = merge<kEntropy>(st, other);
  }
  return st;
}

// Every thread gets the state of the whole block.
template <bool kEntropy>
__device__ __forceinline__ LseState block_reduce(LseState st) {
  __shared__ LseState warp_states[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  st = warp_reduce<kEntropy>(st);
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_states[lane] : empty_state();
    st = warp_reduce<kEntropy>(st);
    if (lane == 0) warp_states[0] = st;
  }
  __syncthreads();
  return warp_states[0];
}

// A row is split into `head` scalars up to the first 16-byte boundary, `num_vec` 16-byte vectors
// and a scalar tail. When the input and output rows are not equally misaligned (a fresh output
// for a sliced input), the whole row goes through the scalar path.
struct RowSplit {
  int64_t head;
  int64_t num_vec;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void* in_row, const void* out_row, int64_t vocab) {
  constexpr int64_t kVec = kVecBytes / sizeof(T);
  const auto in_addr = reinterpret_cast<uintptr_t>(in_row);
  const auto out_addr = reinterpret_cast<uintptr_t>(out_row);
  if ((in_addr - out_addr) % kVecBytes != 0) return {vocab, 0};
  int64_t head = static_cast<int64_t>((kVecBytes - in_addr % kVecBytes) % kVecBytes) / sizeof(T);
  head = head < vocab ? head : vocab;
  return {head, (vocab - head) / kVec};
}

template <typename T, bool kEntropy>
__device__ __forceinline__ void update_scalar(LseState& st, T value) {
  const float x[1] = {to_float(value)};
  update<kEntropy, 1>(st, x);
}

template <typename T, bool kEntropy>
__device__ __forceinline__ void update_pack(LseState& st, const uint4& raw) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const T* vals = reinterpret_cast<const T*>(&raw);
  float x[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) x[k] = to_float(vals[k]);
  update<kEntropy, kVec>(st, x);
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels,
                              int64_t vocab, float* __restrict__ logps, float* __restrict__ lse_out,
                              float* __restrict__ entropy) {
  constexpr int64_t kVec = kVecBytes / sizeof(T);
  const int64_t row_idx = blockIdx.x;
  const int64_t label = labels[row_idx];
  if (label == kIgnoreIndex) {  // prompt / padding tokens: skip the row's bytes entirely
    if (threadIdx.x == 0) {
      logps[row_idx] = 0.f;
      lse_out[row_idx] = 0.f;
      if (kEntropy) entropy[row_idx] = 0.f;
    }
    return;
  }
  const T* row = logits + row_idx * vocab;
  const RowSplit split = split_row<T>(row, row, vocab);
  const int64_t tail_start = split.head + split.num_vec * kVec;
  LseState st = empty_state();
  for (int64_t v = threadIdx.x; v < split.head; v += kThreads) update_scalar<T, kEntropy>(st, row[v]);
  for (int64_t v = tail_start + threadIdx.x; v < vocab; v += kThreads) {
    update_scalar<T, kEntropy>(st, row[v]);
  }
  const uint4* body = reinterpret_cast<const uint4*>(row + split.head);
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < split.num_vec; i += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(body + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) update_pack<T, kEntropy>(st, raw[u]);
  }
  for (; i < split.num_vec; i += kThreads) update_pack<T, kEntropy>(st, __ldg(body + i));

  st = block_reduce<kEntropy>(st);
  if (threadIdx.x == 0) {
    const float log_s = logf(st.s);
    const float lse = st.m + log_s;
    lse_out[row_idx] = lse;
    logps[row_idx] = (label >= 0 && label < vocab) ? to_float(row[label]) - lse : NAN;
    if (kEntropy) entropy[row_idx] = log_s - st.t / st.s;
  }
}

// Per-row constants of the backward: grad(x) = onehot * g - p * (g + g_H * (x + shift)).
struct RowGrad {
  int64_t label;
  float g;      // grad of the log-prob
  float g_ent;  // grad of the entropy
  float lse;
  float shift;  // entropy - lse
};

template <typename T, bool kEntropy>
__device__ __forceinline__ T grad_at(const RowGrad& r, float x, int64_t v) {
  const float p = __expf(x - r.lse);
  float coeff = r.g;
  if (kEntropy) coeff += r.g_ent * (x + r.shift);
  return from_float<T>((v == r.label ? r.g : 0.f) - p * coeff);
}

// `logits` and `grad_logits` may be the same buffer: no __restrict__, and every thread reads its
// elements before it writes them.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_bwd_kernel(const float* __restrict__ grad_logps, const float* __restrict__ grad_entropy,
                              const T* logits, const int64_t* __restrict__ labels,
                              const float* __restrict__ lse, const float* __restrict__ entropy,
                              int64_t vocab, T* grad_logits) {
  constexpr int64_t kVec = kVecBytes / sizeof(T);
  const int64_t row_idx = blockIdx.x;
  const T* in = logits + row_idx * vocab;
  T* out = grad_logits + row_idx * vocab;
  const RowSplit split = split_row<T>(in, out, vocab);
  const int64_t tail_start = split.head + split.num_vec * kVec;
  uint4* out_body = reinterpret_cast<uint4*>(out + split.head);

  RowGrad r;
  r.label = labels[row_idx];
  if (r.label == kIgnoreIndex) {  // zero gradient; the saved lse of this row is 0, not its lse
    const T zero = from_float<T>(0.f);
    for (int64_t v = threadIdx.x; v < split.head; v += kThreads) out[v] = zero;
    for (int64_t v = tail_start + threadIdx.x; v < vocab; v += kThreads) out[v] = zero;
    for (int64_t i = threadIdx.x; i < split.num_vec; i += kThreads) out_body[i] = make_uint4(0, 0, 0, 0);
    return;
  }
  r.g = grad_logps[row_idx];
  r.lse = lse[row_idx];
  r.g_ent = kEntropy ? grad_entropy[row_idx] : 0.f;
  r.shift = kEntropy ? entropy[row_idx] - r.lse : 0.f;

  for (int64_t v = threadIdx.x; v < split.head; v += kThreads) {
    out[v] = grad_at<T, kEntropy>(r, to_float(in[v]), v);
  }
  for (int64_t v = tail_start + threadIdx.x; v < vocab; v += kThreads) {
    out[v] = grad_at<T, kEntropy>(r, to_float(in[v]), v);
  }
  const uint4* in_body = reinterpret_cast<const uint4*>(in + split.head);
  int64_t i = threadIdx.x;
  for (; i < split.num_vec; i += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      raw[u] = i + u * kThreads < split.num_vec ? in_body[i + u * kThreads] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * kThreads;
      if (j >= split.num_vec) break;
      const T* vals = reinterpret_cast<const T*>(&raw[u]);
      uint4 packed;
      T* grads = reinterpret_cast<T*>(&packed);
      const int64_t v0 = split.head + j * kVec;
#pragma unroll
      for (int k = 0; k < kVec; ++k) grads[k] = grad_at<T, kEntropy>(r, to_float(vals[k]), v0 + k);
      out_body[j] = packed;
    }
  }
}

bool too_many_rows(int64_t num_rows) { return num_rows > 0x7fffffffLL; }

template <typename T>
cudaError_t launch_fwd(const void* logits, const int64_t* labels, int64_t num_rows, int64_t vocab,
                       float* logps, float* lse, float* entropy, cudaStream_t stream) {
  const auto* typed = static_cast<const T*>(logits);
  const dim3 grid(static_cast<unsigned>(num_rows));
  if (entropy != nullptr) {
    token_logprobs_fwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(typed, labels, vocab, logps, lse, entropy);
  } else {
    token_logprobs_fwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(typed, labels, vocab, logps, lse, nullptr);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const float* grad_logps, const float* grad_entropy, const void* logits,
                       const int64_t* labels, const float* lse, const float* entropy, int64_t num_rows,
                       int64_t vocab, void* grad_logits, cudaStream_t stream) {
  const auto* in = static_cast<const T*>(logits);
  auto* out = static_cast<T*>(grad_logits);
  const dim3 grid(static_cast<unsigned>(num_rows));
  if (grad_entropy != nullptr) {
    token_logprobs_bwd_kernel<T, true>
        <<<grid, kThreads, 0, stream>>>(grad_logps, grad_entropy, in, labels, lse, entropy, vocab, out);
  } else {
    token_logprobs_bwd_kernel<T, false>
        <<<grid, kThreads, 0, stream>>>(grad_logps, nullptr, in, labels, lse, nullptr, vocab, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_token_logprobs_fwd(const void* logits, LogitsDType dtype, const int64_t* labels,
                                      int64_t num_rows, int64_t vocab, float* logps, float* lse,
                                      float* entropy, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  if (too_many_rows(num_rows) || vocab <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case LogitsDType::kFloat32:
      return launch_fwd<float>(logits, labels, num_rows, vocab, logps, lse, entropy, stream);
    case LogitsDType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(logits, labels, num_rows, vocab, logps, lse, entropy, stream);
    case LogitsDType::kFloat16:
      return launch_fwd<__half>(logits, labels, num_rows, vocab, logps, lse, entropy, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_token_logprobs_bwd(const float* grad_logps, const float* grad_entropy,
                                      const void* logits, LogitsDType dtype, const int64_t* labels,
                                      const float* lse, const float* entropy, int64_t num_rows,
                                      int64_t vocab, void* grad_logits, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  if (too_many_rows(num_rows) || vocab <= 0) return cudaErrorInvalidValue;
  if ((grad_entropy == nullptr) != (entropy == nullptr)) return cudaErrorInvalidValue;
  switch (dtype) {
    case LogitsDType::kFloat32:
      return launch_bwd<float>(grad_logps, grad_entropy, logits, labels, lse, entropy, num_rows, vocab,
                               grad_logits, stream);
    case LogitsDType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(grad_logps, grad_entropy, logits, labels, lse, entropy, num_rows,
                                       vocab, grad_logits, stream);
    case LogitsDType::kFloat16:
      return launch_bwd<__half>(grad_logps, grad_entropy, logits, labels, lse, entropy, num_rows, vocab,
                                grad_logits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hpalign
