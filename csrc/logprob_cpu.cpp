// Per-token log-probs over a large vocabulary: CPU kernel (forward and backward).
//
// Why: `log_softmax(logits.float()).gather(target)` writes a full fp32 [T, V] copy in
// forward and again in backward. Here each row is read once in forward (online
// log-sum-exp over L1-sized blocks) and once in backward (which writes grad_logits in the
// logits' dtype, possibly in place over the logits), so the only [T, V] tensor ever
// allocated is the gradient itself.
//
// Semantics (the project's single definition): z = logits / temperature in fp32,
// logprob = z[target] - logsumexp(z), entropy = -sum softmax(z) * log_softmax(z).
// float64 inputs are computed in float64 (for gradcheck); everything else in fp32.
//
// Rows run in parallel in one OpenMP region with torch's intra-op thread count
// (torch.set_num_threads; see parallel_rows); inner loops are `omp simd` loops the compiler vectorises
// (-fopenmp-simd, -march=native), including a polynomial exp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Elements per block: the block of scaled logits stays in L1 between its two sweeps.
constexpr int64_t kBlock = 2048;
// Independent partial sums per reduction: one or two vector registers wide.
constexpr int kLanes = 16;

// exp(x) for x <= ~88 in fp32, written so `omp simd` loops vectorise it: Cody-Waite range
// reduction to r in [-ln2/2, ln2/2], the Cephes degree-6 polynomial, then 2^n by building
// the exponent bits. Below the fp32 underflow range it returns exactly 0 (so -inf logits
// contribute nothing); NaN stays NaN. Max relative error about 2 ulp.
inline float exp_acc(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float v = y * scale;
  return x >= -87.0f ? v : (x < -87.0f ? 0.0f : x);  // last case: NaN
}

inline double exp_acc(double x) { return std::exp(x); }

// Storage <-> accumulation conversions. bf16 is handled on its raw bits so the loads
// (shift) and the round-to-nearest-even stores vectorise.
template <typename scalar_t>
struct IO {
  using store_t = scalar_t;
  using acc_t = float;
  static inline acc_t load(store_t v) { return static_cast<acc_t>(v); }
  static inline store_t store(acc_t v) { return static_cast<store_t>(v); }
};

template <>
struct IO<double> {
  using store_t = double;
  using acc_t = double;
  static inline double load(double v) { return v; }
  static inline double store(double v) { return v; }
};

template <>
struct IO<c10::BFloat16> {
  using store_t = uint16_t;
  using acc_t = float;
  static inline float load(uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static inline uint16_t store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return f != f ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
  }
};

// One row's online log-sum-exp (and the entropy's running sum), one read of the row.
// Running state relative to the running max m: s = sum e_i, w = sum e_i * d_i, with
// d_i = z_i - m and e_i = exp(d_i); a new block max m' rescales both by exp(m - m').
// The max is an `omp simd` reduction; the sums keep kLanes independent partial results
// (a fixed-width inner loop the compiler maps onto vector registers), which vectorises
// more reliably across dtypes than an `omp simd` sum reduction.
template <typename scalar_t, bool kEnt>
__attribute__((noinline)) void forward_row(const typename IO<scalar_t>::store_t* x, int64_t V,
                        typename IO<scalar_t>::acc_t temperature, int64_t target,
                        typename IO<scalar_t>::acc_t* buf, typename IO<scalar_t>::acc_t* lp,
                        typename IO<scalar_t>::acc_t* lse, typename IO<scalar_t>::acc_t* ent) {
  using acc_t = typename IO<scalar_t>::acc_t;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = ninf, s = 0, w = 0;
  for (int64_t off = 0; off < V; off += kBlock) {
    const int64_t n = std::min(kBlock, V - off);
    const auto* xb = x + off;
    // Sweep 1: scale into the L1 buffer, block max.
    acc_t bm = ninf;
#pragma omp simd reduction(max : bm)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t z = IO<scalar_t>::load(xb[i]) / temperature;
      buf[i] = z;
      bm = z > bm ? z : bm;
    }
    if (bm > m) {
      if (m != ninf) {
        const acc_t delta = m - bm;
        const acc_t scale = exp_acc(delta);
        w = scale * (w + delta * s);
        s = scale * s;
      }
      m = bm;
    }
    if (m == ninf) continue;  // everything so far is -inf
    // Sweep 2: lane-wise sums of exp(z - m) (and of exp(z - m) * (z - m) for the entropy);
    // the buffer is padded with -inf to whole lanes, which add nothing.
    const int64_t n_pad = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t i = n; i < n_pad; ++i) buf[i] = ninf;
    acc_t ls[kLanes], lw[kLanes];
    for (int j = 0; j < kLanes; ++j) ls[j] = lw[j] = 0;
    for (int64_t i = 0; i < n_pad; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t d = buf[i + j] - m;
        const acc_t e = exp_acc(d);
        ls[j] += e;
        // max() keeps 0 * (-inf) out of the sum (it would be NaN) and lets NaN through.
        if (kEnt) lw[j] += e * std::max(d, std::numeric_limits<acc_t>::lowest());
      }
    }
    for (int j = 0; j < kLanes; ++j) {
      s += ls[j];
      w += lw[j];
    }
  }
  // The per-row combination runs in double: it costs nothing and keeps lp accurate to
  // about an ulp of lse rather than a few.
  const double log_s = std::log(static_cast<double>(s));
  const double lse_d = static_cast<double>(m) + log_s;
  *lse = static_cast<acc_t>(lse_d);
  *lp = static_cast<acc_t>(static_cast<double>(IO<scalar_t>::load(x[target]) / temperature) - lse_d);
  if (kEnt) *ent = static_cast<acc_t>(log_s - static_cast<double>(w) / static_cast<double>(s));
}

// d loss / d z_v = g_lp * ([v == target] - p_v) - g_ent * p_v * (log p_v + H), and
// d z / d logits = 1 / temperature. Returns the part without the one-hot term.
template <typename acc_t, bool kEnt>
inline acc_t grad_z(acc_t d, acc_t ent, acc_t g_lp, acc_t g_ent) {
  const acc_t p = exp_acc(d);
  const acc_t t = kEnt ? p * (g_lp + g_ent * (d + ent)) : p * g_lp;
  return p > 0 ? -t : acc_t(0);  // p == 0 at -inf logits, where d * p would be NaN
}

// One row of grad_logits, in blocks: the fp32 gradient goes through an L1 buffer so both
// loops (exp, then the dtype conversion) vectorise. Each block is read before it is
// written, so gx may alias x (in-place backward over a scratch logits buffer).
template <typename scalar_t, bool kEnt>
__attribute__((noinline)) void backward_row(const typename IO<scalar_t>::store_t* x,
                         typename IO<scalar_t>::store_t* gx, int64_t V,
                         typename IO<scalar_t>::acc_t temperature, int64_t target,
                         typename IO<scalar_t>::acc_t lse, typename IO<scalar_t>::acc_t ent,
                         typename IO<scalar_t>::acc_t g_lp, typename IO<scalar_t>::acc_t g_ent,
                         typename IO<scalar_t>::acc_t* buf) {
  using acc_t = typename IO<scalar_t>::acc_t;
  const acc_t inv_t = acc_t(1) / temperature;
  const acc_t d_target = IO<scalar_t>::load(x[target]) / temperature - lse;
  for (int64_t off = 0; off < V; off += kBlock) {
    const int64_t n = std::min(kBlock, V - off);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = IO<scalar_t>::load(x[off + i]) / temperature - lse;
      buf[i] = grad_z<acc_t, kEnt>(d, ent, g_lp, g_ent) * inv_t;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gx[off + i] = IO<scalar_t>::store(buf[i]);
  }
  gx[target] = IO<scalar_t>::store((g_lp + grad_z<acc_t, kEnt>(d_target, ent, g_lp, g_ent)) * inv_t);
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  TORCH_CHECK(logits.dim() == 2, "token_logprobs: logits must be [T, V], got shape ",
              logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "token_logprobs: logits rows must be contiguous");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                  targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "token_logprobs: targets must be a contiguous int64 [T] tensor matching logits");
  TORCH_CHECK(temperature > 0, "token_logprobs: temperature must be > 0, got ", temperature);
  const int64_t T = logits.size(0), V = logits.size(1);
  TORCH_CHECK(T == 0 || V > 0, "token_logprobs: empty vocabulary");
  const int64_t* tg = targets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(tg[t] >= 0 && tg[t] < V, "token_logprobs: targets[", t, "] = ", tg[t],
                " is outside the vocabulary [0, ", V, ")");
  }
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

// Rows [0, T) split into one contiguous range per thread, with torch's intra-op thread count
// (torch.set_num_threads) passed explicitly. at::parallel_for's header-compiled `omp parallel`
// took the OpenMP default instead, and in a process that never called set_num_threads it ran
// on one thread (measured: cpu time == wall time). Rows are independent, so the split does
// not change any result.
template <typename F>
void parallel_rows(int64_t T, int64_t grain, const F& f) {
  int64_t nt = std::min<int64_t>(at::get_num_threads(), (T + grain - 1) / grain);
#ifdef _OPENMP
  if (nt > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
      const int64_t n = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t chunk = (T + n - 1) / n, b = tid * chunk, e = std::min(T, b + chunk);
      if (b < e) f(b, e);
    }
    return;
  }
#endif
  (void)nt;
  if (T > 0) f(0, T);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                  bool with_entropy, at::Tensor& lp, at::Tensor& lse, at::Tensor& ent) {
  using store_t = typename IO<scalar_t>::store_t;
  using acc_t = typename IO<scalar_t>::acc_t;
  const int64_t T = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  const auto* x = reinterpret_cast<const store_t*>(logits.const_data_ptr<scalar_t>());
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  acc_t* lp_p = lp.data_ptr<acc_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  acc_t* ent_p = with_entropy ? ent.data_ptr<acc_t>() : nullptr;
  const acc_t temp = static_cast<acc_t>(temperature);
  parallel_rows(T, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kBlock + kLanes);
    for (int64_t t = begin; t < end; ++t) {
      if (with_entropy) {
        forward_row<scalar_t, true>(x + t * ld, V, temp, tg[t], buf.data(), lp_p + t, lse_p + t,
                                    ent_p + t);
      } else {
        acc_t unused;
        forward_row<scalar_t, false>(x + t * ld, V, temp, tg[t], buf.data(), lp_p + t,
                                     lse_p + t, &unused);
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& ent, const at::Tensor& grad_lp, const at::Tensor& grad_ent,
                   double temperature, at::Tensor& grad_logits) {
  using store_t = typename IO<scalar_t>::store_t;
  using acc_t = typename IO<scalar_t>::acc_t;
  const int64_t T = logits.size(0), V = logits.size(1);
  const int64_t ld = logits.stride(0), gld = grad_logits.stride(0);
  const auto* x = reinterpret_cast<const store_t*>(logits.const_data_ptr<scalar_t>());
  auto* gx = reinterpret_cast<store_t*>(grad_logits.data_ptr<scalar_t>());
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* glp_p = grad_lp.const_data_ptr<acc_t>();
  const bool with_entropy = grad_ent.numel() > 0;
  const acc_t* ent_p = with_entropy ? ent.const_data_ptr<acc_t>() : nullptr;
  const acc_t* gent_p = with_entropy ? grad_ent.const_data_ptr<acc_t>() : nullptr;
  const acc_t temp = static_cast<acc_t>(temperature);
  parallel_rows(T, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kBlock + kLanes);
    for (int64_t t = begin; t < end; ++t) {
      if (with_entropy) {
        backward_row<scalar_t, true>(x + t * ld, gx + t * gld, V, temp, tg[t], lse_p[t],
                                     ent_p[t], glp_p[t], gent_p[t], buf.data());
      } else {
        backward_row<scalar_t, false>(x + t * ld, gx + t * gld, V, temp, tg[t], lse_p[t], 0,
                                      glp_p[t], 0, buf.data());
      }
    }
  });
}

#define AT_LOGPROB_DISPATCH(DTYPE, NAME, ...)                                          \
  switch (DTYPE) {                                                                      \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                  \
    case at::kDouble: { using scalar_t = double; __VA_ARGS__(); break; }                \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; }       \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }               \
    default: TORCH_CHECK(false, NAME ": unsupported logits dtype ", DTYPE);              \
  }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& logits,
                                                           const at::Tensor& targets,
                                                           double temperature, bool with_entropy) {
  check_inputs(logits, targets, temperature);
  const int64_t T = logits.size(0);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc);
  at::Tensor lp = at::empty({T}, opts), lse = at::empty({T}, opts);
  at::Tensor ent = at::empty({with_entropy ? T : 0}, opts);
  AT_LOGPROB_DISPATCH(logits.scalar_type(), "token_logprobs forward", [&] {
    forward_impl<scalar_t>(logits, targets, temperature, with_entropy, lp, lse, ent);
  });
  return {lp, lse, ent};
}

// A fresh [T, V] gradient is mostly untouched memory: writing it costs one page fault per
// 4 KiB page, which at RL sizes (1.2 GB) takes longer than the arithmetic. Asking for
// transparent huge pages on the 2 MiB-aligned interior before the first write cuts the faults
// 512x where the kernel allows it (THP "madvise" or "always"); elsewhere the advice is a no-op.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.numel() * t.element_size());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
#else
  (void)t;
#endif
}

void backward_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& ent, const at::Tensor& grad_lp, const at::Tensor& grad_ent,
                  double temperature, at::Tensor grad_logits) {
  check_inputs(logits, targets, temperature);
  const int64_t T = logits.size(0);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.stride(1) == 1 &&
                  grad_logits.scalar_type() == logits.scalar_type(),
              "token_logprobs backward: grad_logits must match logits");
  for (const at::Tensor* t : {&lse, &grad_lp}) {
    TORCH_CHECK(t->numel() == T && t->is_contiguous() && t->scalar_type() == acc,
                "token_logprobs backward: per-row tensors must be contiguous [T] in ", acc);
  }
  if (grad_ent.numel() > 0) {
    for (const at::Tensor* t : {&ent, &grad_ent}) {
      TORCH_CHECK(t->numel() == T && t->is_contiguous() && t->scalar_type() == acc,
                  "token_logprobs backward: entropy tensors must be contiguous [T] in ", acc);
    }
  }
  advise_huge_pages(grad_logits);
  AT_LOGPROB_DISPATCH(logits.scalar_type(), "token_logprobs backward", [&] {
    backward_impl<scalar_t>(logits, targets, lse, ent, grad_lp, grad_ent, temperature,
                            grad_logits);
  });
}

}  // namespace

TORCH_LIBRARY(at_logprob_cpu, m) {
  m.def(
      "forward(Tensor logits, Tensor targets, float temperature, bool with_entropy)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor logits, Tensor targets, Tensor lse, Tensor entropy, Tensor grad_logprobs,"
      " Tensor grad_entropy, float temperature, Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(at_logprob_cpu, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}
