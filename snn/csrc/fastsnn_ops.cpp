// Native CPU kernels of Fast-SNN, registered as PyTorch custom operators (namespace `fastsnn`).
//
// Built on first use by snn/kernels/cpp.py (torch.utils.cpp_extension.load, is_python_module=False) and
// loaded into the dispatcher with TORCH_LIBRARY: every op checks device, dtype, shapes and layout, has a
// fake (meta) implementation registered from Python (so torch.compile can trace it) and, where a
// gradient exists, an autograd formula (snn/kernels/cpp.py).
//
// Every float operation is the Python reference's (snn.neuron.if_step / if_constant_counts,
// quant.functional.act_levels / weight_quant), in the same order, and the library is compiled without
// fast-math and with -ffp-contract=off: the results are bit-identical to the reference (tested).
//
// Layout: the kernels walk flat memory. A train `cur` is `[T, ...]`, non-overlapping and dense with the
// time dimension outermost (stride(0) == numel / T): contiguous, channels-last or a [T, B, ...] view of
// either. Every other operand of the same shape has the same strides (the Python wrapper copies where
// they differ), so one flat index addresses the same neuron in all of them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLK = 2048;          // neurons per block: membrane and count stay in L1
constexpr int64_t SERIAL = 32768;      // below this many element-steps: one thread

int64_t grain_blocks(int64_t per_block_work) {
  return std::max<int64_t>(1, SERIAL / std::max<int64_t>(1, per_block_work));
}

bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); d++)
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fastsnn: ", what, " must be a CPU tensor (got ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastsnn: ", what, " must be float32 or float64 (got ", t.scalar_type(), ")");
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* what) {
  check_float(t, what);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastsnn: ", what, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(same_strides(t, ref), "fastsnn: ", what, " must have shape ", ref.sizes(), " and strides ",
              ref.strides(), " (got ", t.sizes(), ", ", t.strides(), ")");
}

void check_train(const at::Tensor& cur) {
  check_float(cur, "cur");
  TORCH_CHECK(cur.dim() >= 1, "fastsnn: cur must be [T, ...]");
  TORCH_CHECK(cur.is_non_overlapping_and_dense(), "fastsnn: cur must be dense (contiguous or channels-last)");
  const int64_t T = cur.size(0);
  TORCH_CHECK(T <= 1 || cur.numel() == 0 || cur.stride(0) == cur.numel() / T,
              "fastsnn: the time dimension of cur must be outermost in memory");
}

// ------------------------------------------------------------------------------------ IF neurons
// One IF step of `len` neurons (the reference's if_step, operation by operation): v, n updated in place,
// theta * spike written to o. With a compile-time `len` (one register block, LANES below) the loops are
// unrolled and v, n live in vector registers across the whole time loop.
template <typename R, bool SIGNED, bool RES, bool BOUNDED, int64_t FIXED>
inline __attribute__((always_inline)) void if_lanes(const R* a, const R* r, R* o, R* v, R* n, int64_t len, R theta,
                                                    R neg, R scale, R bound) {
  const int64_t m = FIXED > 0 ? FIXED : len;
_Pragma("omp simd")
  for (int64_t j = 0; j < m; j++) {
    const R x = RES ? a[j] + r[j] : a[j];   // residual current added first: v + (a + r)
    R vv = v[j] + x;                         // V <- V + I
    bool p = vv >= theta;                    // positive spike ...
    if (BOUNDED) p = p && (n[j] < bound);    // ... suppressed while the net count is at T
    vv = p ? vv - theta : vv;                // reset by subtraction
    R sp = p ? R(1) : R(0);
    if (SIGNED) {
      const R nn = n[j];
      const bool ng = (vv < neg) && (nn > R(0));  // negative spike, only while n > 0
      vv = ng ? vv + theta : vv;
      sp = sp - (ng ? R(1) : R(0));
      n[j] = nn + sp;
    }
    v[j] = vv;
    o[j] = sp * scale;
  }
}

// neurons per register block: four SIMD vectors; membrane and net count (8 of the 16 / 32 vector registers)
// stay in registers while the block runs all T steps (one read of each step's current, one write of its train)
#if defined(__AVX512F__)
constexpr int64_t VBYTES = 64;
#elif defined(__AVX__)
constexpr int64_t VBYTES = 32;
#else
constexpr int64_t VBYTES = 16;
#endif
template <typename R>
constexpr int64_t LANES = 4 * VBYTES / int64_t(sizeof(R));

// Large trains do not fit in the cache, and the block's T interleaved streams (each visited for only one
// register block at a time) defeat the hardware prefetcher: each step's current (and residual) is prefetched
// PREFETCH bytes ahead. A train of a quarter of the last-level cache or more (FASTSNN_STREAM_MIN bytes when
// set), whose rows are vector-aligned, is written with non-temporal stores: that spares the read-for-ownership
// of every output line, and a train that large would be evicted before the next layer reads it anyway (a
// smaller one is left in the cache for it). Neither changes a value.
constexpr int64_t PREFETCH = 2048;
constexpr int64_t LINE = 64;
// the size of the largest cache CPU 0 sees (Linux sysfs: the slice a core shares, not the socket's sum
// that sysconf may report); 0 when unknown
int64_t last_level_cache_bytes() {
  int64_t best_level = 0, bytes = 0;
  for (int i = 0; i < 16; i++) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream lf(dir + "level"), sf(dir + "size");
    int64_t level = 0;
    std::string size;
    if (!(lf >> level) || !(sf >> size) || size.empty()) continue;
    int64_t v = std::atoll(size.c_str());
    const char unit = size.back();
    v *= unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : unit == 'G' ? int64_t(1) << 30 : 1;
    if (level > best_level || (level == best_level && v > bytes)) best_level = level, bytes = v;
  }
  return bytes;
}

int64_t stream_min_bytes() {
  static const int64_t v = [] {
    if (const char* e = std::getenv("FASTSNN_STREAM_MIN")) return std::max<int64_t>(0, std::atoll(e));
    const int64_t llc = last_level_cache_bytes();
    return llc > 0 ? llc / 4 : int64_t(8) << 20;
  }();
  return v;
}

// stores `W` values of tmp (64-byte aligned) to o (64-byte aligned) bypassing the cache
template <typename R, int64_t W>
inline __attribute__((always_inline)) void stream_out(const R* tmp, R* o) {
#if defined(__AVX512F__)
  for (int64_t k = 0; k < W * int64_t(sizeof(R)); k += 64) {
    if constexpr (std::is_same_v<R, float>)
      _mm512_stream_ps(reinterpret_cast<float*>(reinterpret_cast<char*>(o) + k),
                       _mm512_load_ps(reinterpret_cast<const float*>(reinterpret_cast<const char*>(tmp) + k)));
    else
      _mm512_stream_pd(reinterpret_cast<double*>(reinterpret_cast<char*>(o) + k),
                       _mm512_load_pd(reinterpret_cast<const double*>(reinterpret_cast<const char*>(tmp) + k)));
  }
#else
  for (int64_t j = 0; j < W; j++) o[j] = tmp[j];
#endif
}

// whether a train of `steps` rows of N values at `out` is written with non-temporal stores (see if_kernel)
template <typename R>
bool streams(const R* out, int64_t N, int64_t steps) {
#if defined(__AVX512F__)
  return steps * N * int64_t(sizeof(R)) >= stream_min_bytes() && (N * int64_t(sizeof(R))) % LINE == 0 &&
         reinterpret_cast<uintptr_t>(out) % LINE == 0;
#else
  return false;
#endif
}

inline void stream_fence(bool stream) {
#if defined(__AVX512F__)
  if (stream) _mm_sfence();  // this thread's streamed stores are visible before it reports done
#endif
}

template <typename R, bool SIGNED, bool RES, bool VIN, bool VOUT, bool BOUNDED>
void if_kernel(const R* cur, const R* res, R* out, int64_t N, int64_t T, R theta, R neg, R scale, R bound,
               const R* vin, const R* nin, R* vout, R* nout) {
  constexpr int64_t W = LANES<R>;
  constexpr int64_t AHEAD = PREFETCH / int64_t(sizeof(R));
  const int64_t nb = (N + BLK - 1) / BLK;
  const bool stream = streams(out, N, T);  // rows t * N + i0 stay aligned when out is and N is whole lines
  at::parallel_for(0, nb, grain_blocks(BLK * T), [&](int64_t b0, int64_t b1) {
    // copies: the lambda's captures are references, which the compiler must otherwise reload after every store
    const R th = theta, ng = neg, sc = scale, bd = bound;
    const R half = R(0.5) * th;  // V0 = theta / 2 (the reference: full_like(cur[0], 0.5) * theta)
    const int64_t i_end = std::min(N, b1 * BLK);
    for (int64_t i0 = b0 * BLK; i0 < i_end; i0 += W) {
      const int64_t len = std::min(W, i_end - i0);
      alignas(64) R v[W], n[W];
      for (int64_t j = 0; j < W; j++) {
        v[j] = (VIN && j < len) ? vin[i0 + j] : half;
        n[j] = (VIN && SIGNED && j < len) ? nin[i0 + j] : R(0);
      }
      const bool ahead = i0 + AHEAD + W <= N;
      // the time loop, with the block width fixed at compile time (full block) or not (the ragged tail)
      auto run_steps = [&](auto fixed, auto streamed) {
        constexpr int64_t F = decltype(fixed)::value;
        for (int64_t t = 0; t < T; t++) {
          const R* a = cur + t * N + i0;
          if (F > 0 && ahead) {
            for (int64_t k = 0; k < W * int64_t(sizeof(R)); k += LINE) {
              __builtin_prefetch(reinterpret_cast<const char*>(a + AHEAD) + k, 0, 3);
              if (RES) __builtin_prefetch(reinterpret_cast<const char*>(res + t * N + i0 + AHEAD) + k, 0, 3);
            }
          }
          if constexpr (decltype(streamed)::value) {
            alignas(64) R tmp[W];
            if_lanes<R, SIGNED, RES, BOUNDED, F>(a, RES ? res + t * N + i0 : a, tmp, v, n, len, th, ng, sc, bd);
            stream_out<R, W>(tmp, out + t * N + i0);
          } else {
            if_lanes<R, SIGNED, RES, BOUNDED, F>(a, RES ? res + t * N + i0 : a, out + t * N + i0, v, n, len, th,
                                                 ng, sc, bd);
          }
        }
      };
      if (len == W && stream)
        run_steps(std::integral_constant<int64_t, W>(), std::true_type());
      else if (len == W)
        run_steps(std::integral_constant<int64_t, W>(), std::false_type());
      else
        run_steps(std::integral_constant<int64_t, 0>(), std::false_type());
      if (VOUT) {
        for (int64_t j = 0; j < len; j++) vout[i0 + j] = v[j];
        if (SIGNED)
          for (int64_t j = 0; j < len; j++) nout[i0 + j] = n[j];
      }
    }
    stream_fence(stream);
  });
}

template <typename R, bool SIGNED, bool RES, bool VIN, bool VOUT>
void if_dispatch_bound(bool bounded, const R* cur, const R* res, R* out, int64_t N, int64_t T, R theta, R neg,
                       R scale, R bound, const R* vin, const R* nin, R* vout, R* nout) {
  if (SIGNED && bounded)
    if_kernel<R, SIGNED, RES, VIN, VOUT, SIGNED>(cur, res, out, N, T, theta, neg, scale, bound, vin, nin, vout, nout);
  else
    if_kernel<R, SIGNED, RES, VIN, VOUT, false>(cur, res, out, N, T, theta, neg, scale, bound, vin, nin, vout, nout);
}

// a 0-dim threshold / level / scale tensor (cur's dtype, CPU): its value, as the reference has it
template <typename R>
R scalar_of(const at::Tensor& t) {
  return *t.data_ptr<R>();
}

void check_scalar(const at::Tensor& t, const at::Tensor& ref, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == ref.scalar_type(), "fastsnn: ", what,
              " must be a one-element CPU tensor of dtype ", ref.scalar_type(), " (got ", t.scalar_type(), ", ",
              t.numel(), " elements on ", t.device(), ")");
}

template <typename R>
void if_run(const at::Tensor& cur, const c10::optional<at::Tensor>& res, const at::Tensor& out,
            const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& n, const at::Tensor& vout,
            const at::Tensor& nout, const at::Tensor& theta_, const at::Tensor& neg_, const at::Tensor& scale_,
            double bound_, bool is_signed, bool state) {
  const int64_t T = cur.size(0);
  const int64_t N = T > 0 ? cur.numel() / T : 0;
  const R theta = scalar_of<R>(theta_), neg = scalar_of<R>(neg_), scale = scalar_of<R>(scale_);
  const bool bounded = std::isfinite(bound_);
  const R bound = bounded ? R(bound_) : R(0);
  const R* c = cur.data_ptr<R>();
  const R* r = res.has_value() ? res->data_ptr<R>() : nullptr;
  R* o = out.data_ptr<R>();
  const R* vi = v.has_value() ? v->data_ptr<R>() : nullptr;
  const R* ni = (is_signed && n.has_value()) ? n->data_ptr<R>() : nullptr;
  R* vo = state ? vout.data_ptr<R>() : nullptr;
  R* no = (state && is_signed) ? nout.data_ptr<R>() : nullptr;
  if (N == 0) return;
  if (T == 0) {  // nothing simulated: the final state is the initial one
    if (state) {
      for (int64_t j = 0; j < N; j++) {
        vo[j] = vi ? vi[j] : R(0.5) * theta;
        if (no) no[j] = ni ? ni[j] : R(0);
      }
    }
    return;
  }
  // the 16 layout variants x bounded, as compile-time flags (no branch in the inner loop)
#define FSNN_CALL(SG, RS, VI, VO) \
  if_dispatch_bound<R, SG, RS, VI, VO>(bounded, c, r, o, N, T, theta, neg, scale, bound, vi, ni, vo, no)
#define FSNN_VO(SG, RS, VI) \
  if (state) { FSNN_CALL(SG, RS, VI, true); } else { FSNN_CALL(SG, RS, VI, false); }
#define FSNN_VI(SG, RS) \
  if (vi) { FSNN_VO(SG, RS, true) } else { FSNN_VO(SG, RS, false) }
#define FSNN_RS(SG) \
  if (r) { FSNN_VI(SG, true) } else { FSNN_VI(SG, false) }
  if (is_signed) { FSNN_RS(true) } else { FSNN_RS(false) }
#undef FSNN_RS
#undef FSNN_VI
#undef FSNN_VO
#undef FSNN_CALL
}

void if_check(const at::Tensor& cur, const c10::optional<at::Tensor>& res, const c10::optional<at::Tensor>& v,
              const c10::optional<at::Tensor>& n, const at::Tensor& theta, const at::Tensor& neg,
              const at::Tensor& scale, bool is_signed, double bound) {
  check_train(cur);
  check_scalar(theta, cur, "theta");
  check_scalar(neg, cur, "neg");
  check_scalar(scale, cur, "scale");
  if (res.has_value()) check_like(*res, cur, "residual");
  TORCH_CHECK(!(std::isfinite(bound) && !is_signed), "fastsnn: a bounded neuron must be signed");
  if (v.has_value() || n.has_value()) {
    TORCH_CHECK(v.has_value(), "fastsnn: a net count n was given without a membrane v");
    TORCH_CHECK(cur.size(0) > 0, "fastsnn: cur has no time steps");
    const at::Tensor c0 = cur.select(0, 0);
    check_like(*v, c0, "v");
    if (is_signed) {
      TORCH_CHECK(n.has_value(), "fastsnn: a signed neuron's state needs its net count n with v");
      check_like(*n, c0, "n");
    }
  }
}

std::tuple<at::Tensor, at::Tensor> state_buffers(const at::Tensor& cur, bool is_signed, bool state) {
  if (!state || cur.size(0) == 0) {
    if (state) {  // T == 0: state of shape cur[0], contiguous
      std::vector<int64_t> shp(cur.sizes().begin() + 1, cur.sizes().end());
      return {at::empty(shp, cur.options()), is_signed ? at::empty(shp, cur.options()) : at::empty({0}, cur.options())};
    }
    return {at::empty({0}, cur.options()), at::empty({0}, cur.options())};
  }
  const at::Tensor c0 = cur.select(0, 0);
  at::Tensor vo = at::empty_strided(c0.sizes(), c0.strides(), cur.options());
  at::Tensor no = is_signed ? at::empty_strided(c0.sizes(), c0.strides(), cur.options()) : at::empty({0}, cur.options());
  return {vo, no};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> if_steps(const at::Tensor& cur, const c10::optional<at::Tensor>& res,
                                                        const c10::optional<at::Tensor>& v,
                                                        const c10::optional<at::Tensor>& n, const at::Tensor& theta,
                                                        const at::Tensor& neg, const at::Tensor& scale, double bound,
                                                        bool is_signed, bool state) {
  if_check(cur, res, v, n, theta, neg, scale, is_signed, bound);
  at::Tensor out = at::empty_strided(cur.sizes(), cur.strides(), cur.options());
  auto [vo, no] = state_buffers(cur, is_signed, state);
  if (cur.scalar_type() == at::kFloat)
    if_run<float>(cur, res, out, v, n, vo, no, theta, neg, scale, bound, is_signed, state);
  else
    if_run<double>(cur, res, out, v, n, vo, no, theta, neg, scale, bound, is_signed, state);
  return {out, vo, no};
}

std::tuple<at::Tensor, at::Tensor> if_steps_inplace(const at::Tensor& cur, const c10::optional<at::Tensor>& res,
                                                    const c10::optional<at::Tensor>& v,
                                                    const c10::optional<at::Tensor>& n, const at::Tensor& theta,
                                                    const at::Tensor& neg, const at::Tensor& scale, double bound,
                                                    bool is_signed, bool state) {
  if_check(cur, res, v, n, theta, neg, scale, is_signed, bound);
  auto [vo, no] = state_buffers(cur, is_signed, state);
  if (cur.scalar_type() == at::kFloat)
    if_run<float>(cur, res, cur, v, n, vo, no, theta, neg, scale, bound, is_signed, state);
  else
    if_run<double>(cur, res, cur, v, n, vo, no, theta, neg, scale, bound, is_signed, state);
  return {vo, no};
}

// the same into a given output (a reused buffer): ``out`` has cur's shape and strides; it may be cur itself or
// the residual (every element is read before the same element is written, step by step)
std::tuple<at::Tensor, at::Tensor> if_steps_into(const at::Tensor& cur, const c10::optional<at::Tensor>& res,
                                                 const c10::optional<at::Tensor>& v,
                                                 const c10::optional<at::Tensor>& n, const at::Tensor& theta,
                                                 const at::Tensor& neg, const at::Tensor& scale, double bound,
                                                 bool is_signed, bool state, const at::Tensor& out) {
  if_check(cur, res, v, n, theta, neg, scale, is_signed, bound);
  check_like(out, cur, "out");
  auto [vo, no] = state_buffers(cur, is_signed, state);
  if (cur.scalar_type() == at::kFloat)
    if_run<float>(cur, res, out, v, n, vo, no, theta, neg, scale, bound, is_signed, state);
  else
    if_run<double>(cur, res, out, v, n, vo, no, theta, neg, scale, bound, is_signed, state);
  return {vo, no};
}

// ------------------------------------------------------------------------ constant input (closed form)
// out[t] = (n_{k(t0+t+1)} - n_{k(t0+t)}) * scale, n_k = floor(clamp(cur / theta, 0, 1) * k + 0.5),
// k(t) = min(t, T): the input is switched off after T steps (settle steps emit nothing).
// `len` neurons of the closed form (register block of LANES when FIXED): x the currents, o = out + offset
// of the first; step t goes to o + t * N
template <typename R, int64_t FIXED, bool STREAM = false>
inline __attribute__((always_inline)) void const_lanes(const R* x, R* o, int64_t N, int64_t len, int64_t t0,
                                                       int64_t steps, int64_t T, R theta, R scale) {
  constexpr int64_t W = FIXED > 0 ? FIXED : LANES<R>;
  const int64_t m = FIXED > 0 ? FIXED : len;
  alignas(64) R u[W], prev[W];
  const R k0 = R(std::min(t0, T));
_Pragma("omp simd")
  for (int64_t j = 0; j < m; j++) {
    R y = x[j] / theta;
    y = y < R(0) ? R(0) : (y > R(1) ? R(1) : y);
    u[j] = y;
    prev[j] = std::floor(y * k0 + R(0.5));
  }
  for (int64_t t = 0; t < steps; t++) {
    const R k = R(std::min(t0 + t + 1, T));
    alignas(64) R tmp[W];
    R* ot = STREAM ? tmp : o + t * N;
_Pragma("omp simd")
    for (int64_t j = 0; j < m; j++) {
      const R nx = std::floor(u[j] * k + R(0.5));
      ot[j] = (nx - prev[j]) * scale;
      prev[j] = nx;
    }
    if constexpr (STREAM) stream_out<R, W>(tmp, o + t * N);
  }
}

// `len` (<= BLK) neurons from x, in register blocks; `stream`: the train streams (see if_kernel) where the
// block's rows are cache-line aligned
template <typename R>
inline void const_run_block(const R* x, R* o, int64_t N, int64_t len, int64_t t0, int64_t steps, int64_t T, R theta,
                            R scale, bool stream) {
  constexpr int64_t W = LANES<R>;
  int64_t i = 0;
  if (stream && reinterpret_cast<uintptr_t>(o) % LINE == 0)
    for (; i + W <= len; i += W) const_lanes<R, W, true>(x + i, o + i, N, W, t0, steps, T, theta, scale);
  for (; i + W <= len; i += W) const_lanes<R, W>(x + i, o + i, N, W, t0, steps, T, theta, scale);
  if (i < len) const_lanes<R, 0>(x + i, o + i, N, len - i, t0, steps, T, theta, scale);
}

template <typename R>
void const_flat(const R* cur, R* out, int64_t N, int64_t t0, int64_t steps, int64_t T, R theta, R scale) {
  const int64_t nb = (N + BLK - 1) / BLK;
  const bool stream = streams(out, N, steps);
  at::parallel_for(0, nb, grain_blocks(BLK * std::max<int64_t>(steps, 1)), [&](int64_t b0, int64_t b1) {
    const R th = theta, sc = scale;
    for (int64_t b = b0; b < b1; b++) {
      const int64_t i0 = b * BLK, len = std::min(BLK, N - i0);
      const_run_block<R>(cur + i0, out + i0, N, len, t0, steps, T, th, sc, stream);
    }
    stream_fence(stream);
  });
}

// dst[j * dstride + i] = src[i * sstride + j] for i < rows, j < cols (rows x cols floats), in 8 x 8 blocks of AVX
// registers where the CPU has them; a plain data move either way
template <typename R>
inline void transpose_block(const R* src, int64_t sstride, R* dst, int64_t dstride, int64_t rows, int64_t cols) {
  int64_t r8 = 0, c8 = 0;
#if defined(__AVX__)
  if constexpr (std::is_same<R, float>::value) {
    r8 = rows / 8 * 8;
    c8 = cols / 8 * 8;
    for (int64_t i = 0; i < r8; i += 8)
      for (int64_t j = 0; j < c8; j += 8) {
        const float* s0 = src + i * sstride + j;
        __m256 r[8], t[8], u[8];
        for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(s0 + k * sstride);
        for (int k = 0; k < 8; k += 2) {
          t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
          t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
        }
        for (int k = 0; k < 8; k += 4) {
          u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
          u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
          u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
          u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        float* d0 = dst + j * dstride + i;
        for (int k = 0; k < 4; k++) {
          _mm256_storeu_ps(d0 + k * dstride, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
          _mm256_storeu_ps(d0 + (k + 4) * dstride, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
        }
      }
  }
#endif
  for (int64_t i = 0; i < rows; i++) {  // what the blocks left: the last rows % 8 rows, the last cols % 8 columns
    const R* si = src + i * sstride;
    for (int64_t j = i < r8 ? c8 : 0; j < cols; j++) dst[j * dstride + i] = si[j];
  }
}

// the same from an NCHW current [B, C, HW] into a channels-last train out[t*N + (b*HW + hw)*C + c]
// (tiles of hwb pixels x C channels: the currents transposed into the cache first, then the closed form as above)
template <typename R>
void const_nchw_to_cl(const R* cur, R* out, int64_t B, int64_t C, int64_t HW, int64_t t0, int64_t steps, int64_t T,
                      R theta, R scale) {
  const int64_t N = B * C * HW;
  // tiles of ~128 KB (L2): long contiguous runs of each channel's row; 8 KB tiles read 256-byte runs from C
  // pages at once and ran 1.6x slower (DeepLab's first layer at 513 px)
  int64_t hwb = std::max<int64_t>(1, 16 * BLK / std::max<int64_t>(C, 1));
  hwb = std::min(hwb, std::max<int64_t>(HW, 1));
  const int64_t ntile = (HW + hwb - 1) / hwb;
  const bool stream = streams(out, N, steps);
  at::parallel_for(0, B * ntile, grain_blocks(hwb * C * std::max<int64_t>(steps, 1)), [&](int64_t j0, int64_t j1) {
    const R th = theta, sc = scale;
    std::vector<R> tx(hwb * C);
    for (int64_t job = j0; job < j1; job++) {
      const int64_t b = job / ntile, h0 = (job % ntile) * hwb;
      const int64_t len = std::min(hwb, HW - h0), m = len * C;
      R* px = tx.data();
      transpose_block<R>(cur + b * C * HW + h0, HW, px, C, C, len);
      R* o = out + (b * HW + h0) * C;
      for (int64_t i = 0; i < m; i += BLK)
        const_run_block<R>(px + i, o + i, N, std::min(BLK, m - i), t0, steps, T, th, sc, stream);
    }
    stream_fence(stream);
  });
}

void if_const_check(const at::Tensor& cur, const at::Tensor& theta, const at::Tensor& scale, int64_t t0,
                    int64_t steps, int64_t T) {
  check_float(cur, "current");
  check_scalar(theta, cur, "theta");
  check_scalar(scale, cur, "scale");
  TORCH_CHECK(cur.dim() >= 1, "fastsnn: the current must be [B, ...]");
  TORCH_CHECK(t0 >= 0 && steps >= 0 && T >= 1, "fastsnn: bad window t0=", t0, " steps=", steps, " T=", T);
}

// the closed-form train written into ``out`` ([steps*B, ...], contiguous or channels-last)
void if_const_run(const at::Tensor& cur, const at::Tensor& theta, const at::Tensor& scale, int64_t t0, int64_t steps,
                  int64_t T, const at::Tensor& out) {
  const int64_t B = cur.size(0);
  const bool cl = cur.dim() == 4 && out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous();
  const int64_t N = cur.numel();
  if (N == 0 || steps == 0) return;
  AT_DISPATCH_FLOATING_TYPES(cur.scalar_type(), "fastsnn_if_const", [&] {
    const scalar_t th = scalar_of<scalar_t>(theta), sc = scalar_of<scalar_t>(scale);
    if (cl && cur.is_contiguous()) {  // NCHW in, channels-last out: transposed in the kernel
      const int64_t C = cur.size(1);
      const_nchw_to_cl<scalar_t>(cur.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, C, N / (B * C), t0, steps,
                                 T, th, sc);
    } else {
      at::Tensor c = cl ? cur.contiguous(at::MemoryFormat::ChannelsLast) : cur.contiguous();
      const_flat<scalar_t>(c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, t0, steps, T, th, sc);
    }
  });
}

at::Tensor if_const(const at::Tensor& cur, const at::Tensor& theta, const at::Tensor& scale, int64_t t0, int64_t steps,
                    int64_t T, bool channels_last) {
  if_const_check(cur, theta, scale, t0, steps, T);
  const int64_t B = cur.size(0);
  std::vector<int64_t> shape(cur.sizes().begin(), cur.sizes().end());
  shape[0] = steps * B;
  const bool cl_in = cur.dim() == 4 && cur.is_contiguous(at::MemoryFormat::ChannelsLast) && !cur.is_contiguous();
  const bool cl = cur.dim() == 4 && (channels_last || cl_in);
  at::Tensor out = at::empty(shape, cur.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                    : at::MemoryFormat::Contiguous));
  if_const_run(cur, theta, scale, t0, steps, T, out);
  return out;
}

// the same into a given output (a reused buffer) of shape [steps*B, ...], contiguous or channels-last
void if_const_into(const at::Tensor& cur, const at::Tensor& theta, const at::Tensor& scale, int64_t t0, int64_t steps,
                   int64_t T, const at::Tensor& out) {
  if_const_check(cur, theta, scale, t0, steps, T);
  check_float(out, "out");
  TORCH_CHECK(out.scalar_type() == cur.scalar_type(), "fastsnn: out has dtype ", out.scalar_type(), ", expected ",
              cur.scalar_type());
  std::vector<int64_t> shape(cur.sizes().begin(), cur.sizes().end());
  shape[0] = steps * cur.size(0);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), "fastsnn: out must have shape ", at::IntArrayRef(shape),
              " (got ", out.sizes(), ")");
  TORCH_CHECK(out.is_contiguous() || (out.dim() == 4 && out.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "fastsnn: out must be contiguous or channels-last");
  if_const_run(cur, theta, scale, t0, steps, T, out);
}

// ------------------------------------------------------------------ statistics: non-zeros per position
at::Tensor nonzero_per_position(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 4, "fastsnn: nonzero_per_position needs [N, C, H, W]");
  const int64_t Nb = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  at::Tensor out = at::zeros({H, W}, x.options().dtype(at::kLong));
  const bool nchw = x.is_contiguous();
  TORCH_CHECK(nchw || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastsnn: nonzero_per_position needs a contiguous or channels-last tensor");
  if (x.numel() == 0) return out;
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastsnn_nz", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    const int64_t rows = nchw ? Nb * C : Nb;
    const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), x.numel() / SERIAL));
    const int64_t per = (rows + nth - 1) / nth;
    std::vector<std::vector<int32_t>> acc(nth, std::vector<int32_t>(HW, 0));
    at::parallel_for(0, nth, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ch++) {
        int32_t* a = acc[ch].data();
        for (int64_t r = ch * per; r < std::min(rows, (ch + 1) * per); r++) {
          if (nchw) {
            const scalar_t* q = p + r * HW;
_Pragma("omp simd")
            for (int64_t j = 0; j < HW; j++) a[j] += q[j] != scalar_t(0);
          } else {
            for (int64_t j = 0; j < HW; j++) {
              const scalar_t* q = p + (r * HW + j) * C;
              int32_t k = 0;
_Pragma("omp simd reduction(+ : k)")
              for (int64_t c = 0; c < C; c++) k += q[c] != scalar_t(0);
              a[j] += k;
            }
          }
        }
      }
    });
    for (int64_t ch = 0; ch < nth; ch++)
      for (int64_t j = 0; j < HW; j++) o[j] += acc[ch][j];
  });
  return out;
}

// ----------------------------------------------------------------------------- activation quantizer
// out = floor(clamp((x [+ r]) / alpha, 0, 1) * n + 0.5) * step -- the order of quant.act_levels
template <typename R>
inline R act_level(R v, R alpha, R n) {
  R u = v / alpha;
  u = u < R(0) ? R(0) : (u > R(1) ? R(1) : u);
  return std::floor(u * n + R(0.5));
}

template <typename R>
inline R act_q(R v, R alpha, R n, R step) {
  return act_level<R>(v, alpha, n) * step;
}

void act_check(const at::Tensor& x, const c10::optional<at::Tensor>& r) {
  check_float(x, "x");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fastsnn: x must be dense (contiguous or channels-last)");
  if (r.has_value()) check_like(*r, x, "residual");
}

// Exact level thresholds (float32). With alpha > 0 every step of the chain above (divide, clamp, multiply, add,
// floor) is correctly rounded and monotone, so the level is a non-decreasing step function of the input:
// level(v) >= k exactly when v >= th[k], th[k] the smallest float whose level is >= k, found by bisection over
// the floats in order (their bit patterns, sign-magnitude mapped onto the integers).
inline int64_t f32_key(float x) {
  int32_t b;
  std::memcpy(&b, &x, 4);
  return b < 0 ? -int64_t(b & 0x7fffffff) : int64_t(b);  // -0.0 and +0.0 share key 0
}

inline float f32_of_key(int64_t k) {
  const uint32_t b = k < 0 ? (uint32_t(-k) | 0x80000000u) : uint32_t(k);
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

float level_threshold(int64_t k, float alpha, float n) {
  const float inf = std::numeric_limits<float>::infinity();
  int64_t lo = f32_key(-inf), hi = f32_key(inf);  // level(-inf) = 0 < k <= n = level(+inf)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (act_level<float>(f32_of_key(mid), alpha, n) >= float(k))
      hi = mid;
    else
      lo = mid;
  }
  return f32_of_key(hi);
}

#if defined(__AVX512F__)
// The float32 quantizer without a division, for n <= 15 levels (bit <= 4), 16 inputs at a time:
// a first guess k0 = floor(clamp(v * (n / alpha) + 0.5 - 2^-10, 0, n)) of the level (one fused multiply-add;
// its error and the chain's are < 2^-18 for levels <= 16, so the bias makes k0 the exact level or the one
// below), corrected by one comparison with the exact threshold of level k0 + 1; the output is the table entry
// k * step (the chain's own product). NaN passes through, as in the chain.
struct ActThresholds {
  alignas(64) float next[16];  // next[k] = th[k + 1]; NaN past n (no input reaches a level above n)
  alignas(64) float value[16];  // value[k] = k * step
  float c, top;
};

bool act_thresholds(float alpha, float n, float step, ActThresholds& t) {
  if (!(alpha >= std::numeric_limits<float>::min() && alpha <= std::numeric_limits<float>::max())) return false;
  if (!(n >= 1.0f && n <= 15.0f && n == std::floor(n))) return false;
  t.c = n / alpha;
  if (!std::isnormal(t.c)) return false;
  t.top = n;
  const int64_t L = int64_t(n);
  for (int64_t k = 0; k < 16; k++) {
    t.next[k] = k + 1 <= L ? level_threshold(k + 1, alpha, n) : std::numeric_limits<float>::quiet_NaN();
    t.value[k] = k <= L ? float(k) * step : 0.0f;
  }
  return true;
}

template <bool RES>
void act_thresh_f32(const float* x, const float* r, float* o, int64_t i0, int64_t i1, const ActThresholds& t,
                    float alpha, float n, float step) {
  const __m512 next = _mm512_load_ps(t.next), value = _mm512_load_ps(t.value);
  const __m512 c = _mm512_set1_ps(t.c), bias = _mm512_set1_ps(0.5f - 1.0f / 1024.0f);
  const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(t.top);
  const __m512i one = _mm512_set1_epi32(1);
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    if (RES) v = _mm512_add_ps(v, _mm512_loadu_ps(r + i));
    const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(v, c, bias), zero), top);  // NaN -> 0
    __m512i k = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(v, _mm512_permutexvar_ps(k, next), _CMP_GE_OQ);
    k = _mm512_mask_add_epi32(k, up, k, one);
    const __mmask16 num = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
    _mm512_storeu_ps(o + i, _mm512_mask_permutexvar_ps(v, num, k, value));
  }
  for (; i < i1; i++) o[i] = act_q<float>(RES ? x[i] + r[i] : x[i], alpha, n, step);
}
#endif

template <typename R>
void act_run(const R* x, const R* r, R* o, int64_t N, double alpha_, double n_, double step_) {
  const R alpha = R(alpha_), n = R(n_), step = R(step_);
#if defined(__AVX512F__)
  if constexpr (std::is_same<R, float>::value) {
    ActThresholds t;
    if (act_thresholds(alpha, n, step, t)) {
      at::parallel_for(0, N, SERIAL, [&](int64_t i0, int64_t i1) {
        if (r)
          act_thresh_f32<true>(x, r, o, i0, i1, t, alpha, n, step);
        else
          act_thresh_f32<false>(x, r, o, i0, i1, t, alpha, n, step);
      });
      return;
    }
  }
#endif
  at::parallel_for(0, N, SERIAL, [&](int64_t i0, int64_t i1) {
    if (r) {
_Pragma("omp simd")
      for (int64_t i = i0; i < i1; i++) o[i] = act_q<R>(x[i] + r[i], alpha, n, step);
    } else {
_Pragma("omp simd")
      for (int64_t i = i0; i < i1; i++) o[i] = act_q<R>(x[i], alpha, n, step);
    }
  });
}

at::Tensor act_quant(const at::Tensor& x, const c10::optional<at::Tensor>& r, double alpha, double n, double step) {
  act_check(x, r);
  at::Tensor out = at::empty_strided(x.sizes(), x.strides(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastsnn_act_quant", [&] {
    act_run<scalar_t>(x.data_ptr<scalar_t>(), r.has_value() ? r->data_ptr<scalar_t>() : nullptr,
                      out.data_ptr<scalar_t>(), x.numel(), alpha, n, step);
  });
  return out;
}

void act_quant_inplace(const at::Tensor& x, const c10::optional<at::Tensor>& r, double alpha, double n, double step) {
  act_check(x, r);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastsnn_act_quant_", [&] {
    act_run<scalar_t>(x.data_ptr<scalar_t>(), r.has_value() ? r->data_ptr<scalar_t>() : nullptr,
                      x.data_ptr<scalar_t>(), x.numel(), alpha, n, step);
  });
}

// the same into a given output (a reused buffer) of x's shape and strides; it may be x or the residual (every
// element is read before it is written)
void act_quant_into(const at::Tensor& x, const c10::optional<at::Tensor>& r, double alpha, double n, double step,
                    const at::Tensor& out) {
  act_check(x, r);
  check_like(out, x, "out");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastsnn_act_quant_into", [&] {
    act_run<scalar_t>(x.data_ptr<scalar_t>(), r.has_value() ? r->data_ptr<scalar_t>() : nullptr,
                      out.data_ptr<scalar_t>(), x.numel(), alpha, n, step);
  });
}

// chunked parallel sum: the partial sums of a fixed partition, added in order (deterministic for a
// given thread count)
template <typename F>
std::vector<double> chunk_sums(int64_t N, int k, F body) {
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / SERIAL));
  const int64_t per = (N + nth - 1) / nth;
  std::vector<double> part(nth * k, 0.0);
  at::parallel_for(0, nth, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c++) body(c * per, std::min(N, (c + 1) * per), part.data() + c * k);
  });
  std::vector<double> tot(k, 0.0);
  for (int64_t c = 0; c < nth; c++)
    for (int j = 0; j < k; j++) tot[j] += part[c * k + j];
  return tot;
}

// one chunk of the quantized ReLU's backward: writes gx (WANT_X) and returns the chunk's sum for the clip's
// gradient. A plain function of values and pointers: inside the dispatch lambda (captures by reference) the
// loop does not vectorise and runs ~10x slower.
template <typename R, bool WANT_X>
double act_bwd_chunk(const R* __restrict xp, const R* __restrict gp, R* __restrict gxp, int64_t i0, int64_t i1,
                     const R alpha, const R n, const R inv_n) {
  double s = 0.0;
_Pragma("omp simd reduction(+ : s)")
  for (int64_t i = i0; i < i1; i++) {
    const R xv = xp[i], gv = gp[i];
    if (WANT_X) gxp[i] = gv * ((xv >= R(0)) & (xv <= alpha) ? R(1) : R(0));
    R u = xv / alpha;
    u = u < R(0) ? R(0) : (u > R(1) ? R(1) : u);
    const R level = std::floor(u * n + R(0.5));
    // y = max(x, 0); for y <= alpha, y / alpha is the clamped u (same division)
    const R d = (xv < R(0) ? R(0) : xv) > alpha ? R(1) : level * inv_n - u;
    s += double(gv * d);
  }
  return s;
}

// backward of the quantized ReLU (straight-through estimator, quant.functional._ActQuant):
// gx = g * (0 <= x <= alpha); galpha = sum(g * (y > alpha ? 1 : level / n - y / alpha)), y = max(x, 0)
std::tuple<at::Tensor, at::Tensor> act_quant_bwd(const at::Tensor& x, const at::Tensor& g, double alpha_, double n_,
                                                 bool want_x, bool want_alpha) {
  check_float(x, "x");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fastsnn: x must be dense");
  check_like(g, x, "grad");
  at::Tensor gx = want_x ? at::empty_strided(x.sizes(), x.strides(), x.options()) : at::empty({0}, x.options());
  at::Tensor ga = at::zeros({}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastsnn_act_bwd", [&] {
    using R = scalar_t;
    const R alpha = R(alpha_), n = R(n_), inv_n = R(1.0 / n_);
    const R* xp = x.data_ptr<R>();
    const R* gp = g.data_ptr<R>();
    R* gxp = want_x ? gx.data_ptr<R>() : nullptr;
    const int64_t N = x.numel();
    if (!want_alpha) {
      if (gxp)
        at::parallel_for(0, N, SERIAL, [&](int64_t i0, int64_t i1) {
_Pragma("omp simd")
          for (int64_t i = i0; i < i1; i++) {
            const R xv = xp[i];
            gxp[i] = gp[i] * ((xv >= R(0)) & (xv <= alpha) ? R(1) : R(0));
          }
        });
      return;
    }
    auto tot = chunk_sums(N, 1, [&](int64_t i0, int64_t i1, double* acc) {
      acc[0] = gxp ? act_bwd_chunk<R, true>(xp, gp, gxp, i0, i1, alpha, n, inv_n)
                   : act_bwd_chunk<R, false>(xp, gp, gxp, i0, i1, alpha, n, inv_n);
    });
    ga.fill_(tot[0]);
  });
  return {gx, ga};
}

// --------------------------------------------------------------------------------- weight quantizer
// quant.functional.weight_quant: w_hat = (w - mu) / s (s = std + eps), r = w_hat / alpha, v = clamp(r, -1, 1),
// q = sign(v) * mags[#(mids < |v|)], out = q * alpha. mids: the L-1 midpoints, padded with +inf to 15 when
// L <= 16 (a fixed trip count vectorises).
template <typename R, int TRIP>
inline R wq_q(R r, const R* mids, const R* mags, int L) {
  const R v = r < R(-1) ? R(-1) : (r > R(1) ? R(1) : r);
  const R a = v < R(0) ? -v : v;
  int k = 0;
  const int trip = TRIP > 0 ? TRIP : L - 1;
  for (int j = 0; j < trip; j++) k += mids[j] < a;
  const R sg = v > R(0) ? R(1) : (v < R(0) ? R(-1) : R(0));
  return sg * mags[k];
}

void wq_check(const at::Tensor& w, const at::Tensor& mids, const at::Tensor& mags) {
  check_float(w, "w");
  TORCH_CHECK(w.is_contiguous(), "fastsnn: the weight must be contiguous");
  check_float(mids, "mids");
  check_float(mags, "mags");
  TORCH_CHECK(mids.scalar_type() == w.scalar_type() && mags.scalar_type() == w.scalar_type(),
              "fastsnn: mids / mags must have the weight's dtype");
  TORCH_CHECK(mids.is_contiguous() && mags.is_contiguous() && mags.dim() == 1 && mids.dim() == 1,
              "fastsnn: mids / mags must be contiguous vectors");
  TORCH_CHECK(mags.numel() >= 1 && (mags.numel() > 16 ? mids.numel() >= mags.numel() - 1 : mids.numel() >= 15),
              "fastsnn: mids must hold the L-1 midpoints (padded to 15 when L <= 16)");
}

at::Tensor wq_fwd(const at::Tensor& w, double mu_, double s_, double alpha_, const at::Tensor& mids,
                  const at::Tensor& mags) {
  wq_check(w, mids, mags);
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  const int L = int(mags.numel());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastsnn_wq_fwd", [&] {
    using R = scalar_t;
    const R mu = R(mu_), s = R(s_), alpha = R(alpha_);
    const R* wp = w.data_ptr<R>();
    const R* mi = mids.data_ptr<R>();
    const R* ma = mags.data_ptr<R>();
    R* op = out.data_ptr<R>();
    at::parallel_for(0, w.numel(), SERIAL, [&](int64_t i0, int64_t i1) {
      if (L <= 16) {
_Pragma("omp simd")
        for (int64_t i = i0; i < i1; i++) op[i] = wq_q<R, 15>(((wp[i] - mu) / s) / alpha, mi, ma, L) * alpha;
      } else {
        for (int64_t i = i0; i < i1; i++) op[i] = wq_q<R, 0>(((wp[i] - mu) / s) / alpha, mi, ma, L) * alpha;
      }
    });
  });
  return out;
}

// one chunk of the weight quantizer's backward sums (sum gh, sum gh * c, sum g * d), a plain function of values
// and pointers so that the loop vectorises (see act_bwd_chunk)
template <typename R, int TRIP>
void wq_bwd_chunk(const R* __restrict wp, const R* __restrict gp, const R* mi, const R* ma, int L, int64_t i0,
                  int64_t i1, const R mu, const R s, const R alpha, const int po, double* acc) {
  double s_g = 0.0, s_gc = 0.0, s_a = 0.0;
_Pragma("omp simd reduction(+ : s_g, s_gc, s_a)")
  for (int64_t i = i0; i < i1; i++) {
    const R c = wp[i] - mu;
    const R r = (c / s) / alpha;
    const R q = wq_q<R, TRIP>(r, mi, ma, L);
    const int outside = (r < R(0) ? -r : r) > R(1);
    const R gv = gp[i];
    const R gh = gv * ((po | !outside) ? R(1) : R(0));
    const R d = outside ? (r > R(0) ? R(1) : R(-1)) : q - r;
    s_g += double(gh);
    s_gc += double(gh) * double(c);
    s_a += double(gv * d);
  }
  acc[0] = s_g;
  acc[1] = s_gc;
  acc[2] = s_a;
}

// backward: pass 1 sums of gh = g * (inside or pass_outside), of gh * (w - mu), and of the clip's gradient
// g * (outside ? sign(r) : q - r); pass 2: grad_w = gh / s + k0 + k1 * (w - mu) (standardisation backward:
// mean and unbiased std). Returns (grad_w or an empty tensor, the three sums as float64).
std::tuple<at::Tensor, at::Tensor> wq_bwd(const at::Tensor& w, const at::Tensor& g, double mu_, double s_, double sd,
                                          double alpha_, const at::Tensor& mids, const at::Tensor& mags,
                                          bool pass_outside, bool want_w) {
  wq_check(w, mids, mags);
  TORCH_CHECK(g.sizes() == w.sizes() && g.is_contiguous() && g.scalar_type() == w.scalar_type() && g.device().is_cpu(),
              "fastsnn: the gradient must be a contiguous CPU tensor like the weight");
  const int L = int(mags.numel());
  const int64_t N = w.numel();
  at::Tensor gw = want_w ? at::empty_like(w, at::MemoryFormat::Contiguous) : at::empty({0}, w.options());
  at::Tensor sums = at::empty({3}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastsnn_wq_bwd", [&] {
    using R = scalar_t;
    const R mu = R(mu_), s = R(s_), alpha = R(alpha_);
    const R* wp = w.data_ptr<R>();
    const R* gp = g.data_ptr<R>();
    const R* mi = mids.data_ptr<R>();
    const R* ma = mags.data_ptr<R>();
    const int po = pass_outside ? 1 : 0;
    auto tot = chunk_sums(N, 3, [&](int64_t i0, int64_t i1, double* acc) {
      if (L <= 16)
        wq_bwd_chunk<R, 15>(wp, gp, mi, ma, L, i0, i1, mu, s, alpha, po, acc);
      else
        wq_bwd_chunk<R, 0>(wp, gp, mi, ma, L, i0, i1, mu, s, alpha, po, acc);
    });
    double* sp = sums.data_ptr<double>();
    sp[0] = tot[0];
    sp[1] = tot[1];
    sp[2] = tot[2];
    if (want_w) {
      const double dlds = -tot[1] / (s_ * s_);                                      // d loss / d (std + eps)
      const double k1d = N > 1 ? dlds / (double(N - 1) * sd) : std::numeric_limits<double>::quiet_NaN();
      const double k0d = -(tot[0] / double(N)) / s_;                                // through w - mean(w)
      const R k0 = R(k0d), k1 = R(k1d);
      R* gwp = gw.data_ptr<R>();
      at::parallel_for(0, N, SERIAL, [&](int64_t i0, int64_t i1) {
_Pragma("omp simd")
        for (int64_t i = i0; i < i1; i++) {
          const R c = wp[i] - mu;
          const R r = (c / s) / alpha;
          const int outside = (r < R(0) ? -r : r) > R(1);
          const R gh = gp[i] * ((po | !outside) ? R(1) : R(0));
          gwp[i] = gh / s + k0 + k1 * c;
        }
      });
    }
  });
  return {gw, sums};
}

}  // namespace

TORCH_LIBRARY(fastsnn, m) {
  m.def("if_steps(Tensor cur, Tensor? res, Tensor? v, Tensor? n, Tensor theta, Tensor neg, Tensor scale, float bound, "
        "bool signed, bool state) -> (Tensor, Tensor, Tensor)");
  m.def("if_steps_inplace(Tensor(a!) cur, Tensor? res, Tensor? v, Tensor? n, Tensor theta, Tensor neg, Tensor scale, "
        "float bound, bool signed, bool state) -> (Tensor, Tensor)");
  m.def("if_steps_into(Tensor cur, Tensor? res, Tensor? v, Tensor? n, Tensor theta, Tensor neg, Tensor scale, "
        "float bound, bool signed, bool state, Tensor(a!) out) -> (Tensor, Tensor)");
  m.def("if_const_into(Tensor cur, Tensor theta, Tensor scale, int t0, int steps, int T, Tensor(a!) out) -> ()");
  m.def("if_const(Tensor cur, Tensor theta, Tensor scale, int t0, int steps, int T, bool channels_last) -> Tensor");
  m.def("nonzero_per_position(Tensor x) -> Tensor");
  m.def("act_quant(Tensor x, Tensor? r, float alpha, float n, float step) -> Tensor");
  m.def("act_quant_inplace(Tensor(a!) x, Tensor? r, float alpha, float n, float step) -> ()");
  m.def("act_quant_into(Tensor x, Tensor? r, float alpha, float n, float step, Tensor(a!) out) -> ()");
  m.def("act_quant_bwd(Tensor x, Tensor g, float alpha, float n, bool want_x, bool want_alpha) -> (Tensor, Tensor)");
  m.def("wq_fwd(Tensor w, float mu, float s, float alpha, Tensor mids, Tensor mags) -> Tensor");
  m.def("wq_bwd(Tensor w, Tensor g, float mu, float s, float sd, float alpha, Tensor mids, Tensor mags, "
        "bool pass_outside, bool want_w) -> (Tensor, Tensor)");
  m.def("stream_min_bytes() -> int", [] { return stream_min_bytes(); });  // the IF trains' streaming threshold
}

TORCH_LIBRARY_IMPL(fastsnn, CPU, m) {
  m.impl("if_steps", &if_steps);
  m.impl("if_steps_inplace", &if_steps_inplace);
  m.impl("if_const", &if_const);
  m.impl("if_steps_into", &if_steps_into);
  m.impl("if_const_into", &if_const_into);
  m.impl("nonzero_per_position", &nonzero_per_position);
  m.impl("act_quant", &act_quant);
  m.impl("act_quant_inplace", &act_quant_inplace);
  m.impl("act_quant_into", &act_quant_into);
  m.impl("act_quant_bwd", &act_quant_bwd);
  m.impl("wq_fwd", &wq_fwd);
  m.impl("wq_bwd", &wq_bwd);
}
