// Per-token log-probs over a large vocabulary: CUDA kernel (forward and backward).
//
// One thread block per row. Forward: each thread streams its share of the row with
// 16-byte loads (8 bf16 / 4 fp32 values), keeping an online log-sum-exp (running max m,
// s = sum exp(z - m), and w = sum exp(z - m) * (z - m) for the entropy) in fp32; the
// block then merges the per-thread states with warp shuffles. The row is read once and
// nothing of size [T, V] is written. Backward: one more read of the row, writing
// grad_logits in the logits' dtype (each element is read before it is written by the same
// thread, so grad_logits may alias logits).
//
// Semantics match csrc/logprob_cpu.cpp and at_core/logprob.py: z = logits / temperature,
// logprob = z[target] - logsumexp(z), entropy = -sum p log p, all in fp32 (float64 for
// float64 inputs). An out-of-range target yields NaN (the Python layer checks CPU inputs;
// checking here would need a host sync).

#include "logprob_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Storage <-> accumulation conversions (scalar_t is the stored CUDA type).
template <typename scalar_t>
struct Traits;

template <>
struct Traits<float> {
  using store_t = float;
  using acc_t = float;
  __device__ static acc_t load(store_t v) { return v; }
  __device__ static store_t store(acc_t v) { return v; }
};

template <>
struct Traits<double> {
  using store_t = double;
  using acc_t = double;
  __device__ static acc_t load(store_t v) { return v; }
  __device__ static store_t store(acc_t v) { return v; }
};

template <>
struct Traits<__nv_bfloat16> {
  using store_t = __nv_bfloat16;
  using acc_t = float;
  __device__ static acc_t load(store_t v) { return __bfloat162float(v); }
  __device__ static store_t store(acc_t v) { return __float2bfloat16_rn(v); }
};

template <>
struct Traits<__half> {
  using store_t = __half;
  using acc_t = float;
  __device__ static acc_t load(store_t v) { return __half2float(v); }
  __device__ static store_t store(acc_t v) { return __float2half_rn(v); }
};

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// A 16-byte packet of stored values.
template <typename store_t>
struct alignas(16) Packet {
  static constexpr int kN = 16 / sizeof(store_t);
  store_t v[kN];
};

// Online log-sum-exp state relative to its own max m.
template <typename acc_t>
struct LseState {
  acc_t m, s, w;
};

// Merge two states (either may be empty: m = -inf, s = w = 0).
template <typename acc_t, bool kEnt>
__device__ __forceinline__ LseState<acc_t> merge(LseState<acc_t> a, LseState<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return a;
  LseState<acc_t> r{m, 0, 0};
  if (a.m != -INFINITY) {
    const acc_t d = a.m - m, f = exp_acc(d);
    r.s += f * a.s;
    if (kEnt) r.w += f * (a.w + d * a.s);
  }
  if (b.m != -INFINITY) {
    const acc_t d = b.m - m, f = exp_acc(d);
    r.s += f * b.s;
    if (kEnt) r.w += f * (b.w + d * b.s);
  }
  return r;
}

// Fold a group of values (already scaled by 1/temperature) into the state: one rescale per
// group, one exp per value.
template <typename acc_t, bool kEnt, int N>
__device__ __forceinline__ void accumulate(LseState<acc_t>& st, const acc_t (&z)[N]) {
  acc_t gm = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) gm = z[i] > gm ? z[i] : gm;
  if (gm > st.m) {
    if (st.m != -INFINITY) {
      const acc_t d = st.m - gm, f = exp_acc(d);
      if (kEnt) st.w = f * (st.w + d * st.s);
      st.s *= f;
    }
    st.m = gm;
  }
  if (st.m == -INFINITY) return;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const acc_t d = z[i] - st.m;
    const acc_t e = exp_acc(d);
    st.s += e;
    if (kEnt && e > 0) st.w += e * d;
  }
}

template <typename acc_t, bool kEnt>
__device__ __forceinline__ LseState<acc_t> block_reduce(LseState<acc_t> st) {
  __shared__ acc_t sm[kWarps], ss[kWarps], sw[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState<acc_t> o{__shfl_xor_sync(0xffffffffu, st.m, off),
                      __shfl_xor_sync(0xffffffffu, st.s, off),
                      __shfl_xor_sync(0xffffffffu, st.w, off)};
    st = merge<acc_t, kEnt>(st, o);
  }
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    sw[warp] = st.w;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? LseState<acc_t>{sm[lane], ss[lane], sw[lane]}
                       : LseState<acc_t>{-INFINITY, 0, 0};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      LseState<acc_t> o{__shfl_xor_sync(0xffffffffu, st.m, off),
                        __shfl_xor_sync(0xffffffffu, st.s, off),
                        __shfl_xor_sync(0xffffffffu, st.w, off)};
      st = merge<acc_t, kEnt>(st, o);
    }
  }
  return st;  // valid in thread 0
}

template <typename scalar_t, bool kEnt, bool kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const typename Traits<scalar_t>::store_t* __restrict__ x, int64_t ld,
                   int64_t V, const int64_t* __restrict__ targets, double temperature,
                   typename Traits<scalar_t>::acc_t* __restrict__ lp,
                   typename Traits<scalar_t>::acc_t* __restrict__ lse,
                   typename Traits<scalar_t>::acc_t* __restrict__ ent) {
  using T = Traits<scalar_t>;
  using acc_t = typename T::acc_t;
  using store_t = typename T::store_t;
  const int64_t row = blockIdx.x;
  const store_t* xr = x + row * ld;
  const acc_t temp = static_cast<acc_t>(temperature);
  const bool unit = temperature == 1.0;  // x / 1 == x: skip the IEEE division (uniform branch)
  LseState<acc_t> st{-INFINITY, 0, 0};
  int64_t done = 0;
  if (kVec) {
    using P = Packet<store_t>;
    constexpr int N = P::kN;
    const int64_t n_vec = V / N;
    const P* xp = reinterpret_cast<const P*>(xr);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const P p = xp[i];
      acc_t z[N];
#pragma unroll
      for (int k = 0; k < N; ++k) z[k] = unit ? T::load(p.v[k]) : T::load(p.v[k]) / temp;
      accumulate<acc_t, kEnt, N>(st, z);
    }
    done = n_vec * N;
  }
  for (int64_t i = done + threadIdx.x; i < V; i += kThreads) {
    const acc_t z[1] = {unit ? T::load(xr[i]) : T::load(xr[i]) / temp};
    accumulate<acc_t, kEnt, 1>(st, z);
  }
  st = block_reduce<acc_t, kEnt>(st);
  if (threadIdx.x == 0) {
    const int64_t t = targets[row];
    const double log_s = log(static_cast<double>(st.s));
    const double l = static_cast<double>(st.m) + log_s;
    lse[row] = static_cast<acc_t>(l);
    const bool ok = t >= 0 && t < V;
    lp[row] = ok ? static_cast<acc_t>(static_cast<double>(T::load(xr[ok ? t : 0]) / temp) - l)
                 : static_cast<acc_t>(NAN);
    if (kEnt) ent[row] = static_cast<acc_t>(log_s - static_cast<double>(st.w) / st.s);
  }
}

// d loss / d z_v = g_lp * ([v == target] - p_v) - g_ent * p_v * (log p_v + H); / temperature.
template <typename acc_t, bool kEnt>
__device__ __forceinline__ acc_t grad_logit(acc_t z, bool is_target, acc_t lse, acc_t ent,
                                            acc_t g_lp, acc_t g_ent, acc_t inv_t) {
  const acc_t d = z - lse;
  const acc_t p = exp_acc(d);
  acc_t t = kEnt ? p * (g_lp + g_ent * (d + ent)) : p * g_lp;
  t = p > 0 ? t : acc_t(0);
  return ((is_target ? g_lp : acc_t(0)) - t) * inv_t;
}

template <typename scalar_t, bool kEnt, bool kVec>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const typename Traits<scalar_t>::store_t* x, int64_t ld,
                    typename Traits<scalar_t>::store_t* gx, int64_t gld, int64_t V,
                    const int64_t* __restrict__ targets, double temperature,
                    const typename Traits<scalar_t>::acc_t* __restrict__ lse,
                    const typename Traits<scalar_t>::acc_t* __restrict__ ent,
                    const typename Traits<scalar_t>::acc_t* __restrict__ grad_lp,
                    const typename Traits<scalar_t>::acc_t* __restrict__ grad_ent) {
  using T = Traits<scalar_t>;
  using acc_t = typename T::acc_t;
  using store_t = typename T::store_t;
  const int64_t row = blockIdx.x;
  const store_t* xr = x + row * ld;
  store_t* gr = gx + row * gld;
  const acc_t temp = static_cast<acc_t>(temperature);
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const bool unit = temperature == 1.0;
  const int64_t target = targets[row];
  const acc_t l = lse[row], g_lp = grad_lp[row];
  const acc_t h = kEnt ? ent[row] : acc_t(0), g_h = kEnt ? grad_ent[row] : acc_t(0);
  int64_t done = 0;
  if (kVec) {
    using P = Packet<store_t>;
    constexpr int N = P::kN;
    const int64_t n_vec = V / N;
    const P* xp = reinterpret_cast<const P*>(xr);
    P* gp = reinterpret_cast<P*>(gr);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const P p = xp[i];
      P o;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int64_t v = i * N + k;
        const acc_t z = unit ? T::load(p.v[k]) : T::load(p.v[k]) / temp;
        o.v[k] = T::store(grad_logit<acc_t, kEnt>(z, v == target, l, h, g_lp, g_h, inv_t));
      }
      gp[i] = o;
    }
    done = n_vec * N;
  }
  for (int64_t v = done + threadIdx.x; v < V; v += kThreads) {
    const acc_t z = unit ? T::load(xr[v]) : T::load(xr[v]) / temp;
    gr[v] = T::store(grad_logit<acc_t, kEnt>(z, v == target, l, h, g_lp, g_h, inv_t));
  }
}

bool aligned16(const void* p, int64_t ld_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld_bytes % 16 == 0;
}

template <typename scalar_t, bool kEnt>
void forward_typed(const at_logprob::Rows& in, void* lp, void* lse, void* ent,
                   cudaStream_t stream) {
  using T = Traits<scalar_t>;
  using store_t = typename T::store_t;
  using acc_t = typename T::acc_t;
  const auto* x = static_cast<const store_t*>(in.x);
  auto* lp_p = static_cast<acc_t*>(lp);
  auto* lse_p = static_cast<acc_t*>(lse);
  auto* ent_p = static_cast<acc_t*>(ent);
  const dim3 grid(static_cast<unsigned>(in.rows)), block(kThreads);
  if (aligned16(x, in.ld * static_cast<int64_t>(sizeof(store_t)))) {
    forward_kernel<scalar_t, kEnt, true><<<grid, block, 0, stream>>>(
        x, in.ld, in.V, in.targets, in.temperature, lp_p, lse_p, ent_p);
  } else {
    forward_kernel<scalar_t, kEnt, false><<<grid, block, 0, stream>>>(
        x, in.ld, in.V, in.targets, in.temperature, lp_p, lse_p, ent_p);
  }
}

template <typename scalar_t, bool kEnt>
void backward_typed(const at_logprob::Rows& in, void* gx, int64_t gld, const void* lse,
                    const void* ent, const void* grad_lp, const void* grad_ent,
                    cudaStream_t stream) {
  using T = Traits<scalar_t>;
  using store_t = typename T::store_t;
  using acc_t = typename T::acc_t;
  const auto* x = static_cast<const store_t*>(in.x);
  auto* g = static_cast<store_t*>(gx);
  const int64_t sz = static_cast<int64_t>(sizeof(store_t));
  const auto* lse_p = static_cast<const acc_t*>(lse);
  const auto* ent_p = static_cast<const acc_t*>(ent);
  const auto* glp_p = static_cast<const acc_t*>(grad_lp);
  const auto* gent_p = static_cast<const acc_t*>(grad_ent);
  const dim3 grid(static_cast<unsigned>(in.rows)), block(kThreads);
  if (aligned16(x, in.ld * sz) && aligned16(g, gld * sz)) {
    backward_kernel<scalar_t, kEnt, true><<<grid, block, 0, stream>>>(
        x, in.ld, g, gld, in.V, in.targets, in.temperature, lse_p, ent_p, glp_p, gent_p);
  } else {
    backward_kernel<scalar_t, kEnt, false><<<grid, block, 0, stream>>>(
        x, in.ld, g, gld, in.V, in.targets, in.temperature, lse_p, ent_p, glp_p, gent_p);
  }
}

template <typename scalar_t>
void forward_dispatch_ent(const at_logprob::Rows& in, void* lp, void* lse, void* ent,
                          cudaStream_t stream) {
  if (ent != nullptr) {
    forward_typed<scalar_t, true>(in, lp, lse, ent, stream);
  } else {
    forward_typed<scalar_t, false>(in, lp, lse, ent, stream);
  }
}

template <typename scalar_t>
void backward_dispatch_ent(const at_logprob::Rows& in, void* gx, int64_t gld, const void* lse,
                           const void* ent, const void* grad_lp, const void* grad_ent,
                           cudaStream_t stream) {
  if (grad_ent != nullptr) {
    backward_typed<scalar_t, true>(in, gx, gld, lse, ent, grad_lp, grad_ent, stream);
  } else {
    backward_typed<scalar_t, false>(in, gx, gld, lse, ent, grad_lp, grad_ent, stream);
  }
}

}  // namespace

namespace at_logprob {

cudaError_t launch_forward(DType dtype, const Rows& in, void* lp, void* lse, void* ent,
                           cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: forward_dispatch_ent<float>(in, lp, lse, ent, stream); break;
    case DType::kFloat64: forward_dispatch_ent<double>(in, lp, lse, ent, stream); break;
    case DType::kBFloat16: forward_dispatch_ent<__nv_bfloat16>(in, lp, lse, ent, stream); break;
    case DType::kFloat16: forward_dispatch_ent<__half>(in, lp, lse, ent, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_backward(DType dtype, const Rows& in, void* gx, int64_t gld, const void* lse,
                            const void* ent, const void* grad_lp, const void* grad_ent,
                            cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      backward_dispatch_ent<float>(in, gx, gld, lse, ent, grad_lp, grad_ent, stream);
      break;
    case DType::kFloat64:
      backward_dispatch_ent<double>(in, gx, gld, lse, ent, grad_lp, grad_ent, stream);
      break;
    case DType::kBFloat16:
      backward_dispatch_ent<__nv_bfloat16>(in, gx, gld, lse, ent, grad_lp, grad_ent, stream);
      break;
    case DType::kFloat16:
      backward_dispatch_ent<__half>(in, gx, gld, lse, ent, grad_lp, grad_ent, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace at_logprob
