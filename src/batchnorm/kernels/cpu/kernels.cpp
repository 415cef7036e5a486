// The CPU kernels: at::vec::Vectorized loops on torch's own thread pool (at::parallel_for).
//
// Work split. (N, C, S): one task is a range of whole channels, so each channel's statistics and
// its elementwise pass run back to back while its N * S values are in cache (the fused step:
// read x once from memory, write y once). (M, C): a task is a range of rows; the reduction leaves
// per-thread partial sums that are merged in double, then the elementwise pass runs over the same
// row ranges (at::parallel_for splits a range the same way each time), so each thread finds its
// rows in its own cache when they fit.
//
// Statistics. One pass of shifted sums: d = x - shift, sum(d) and sum(d^2), where shift is the
// mean of the channel's first few values, so the sums see the channel's spread, not its offset
// (float32 data with mean 1e4 and unit variance keep their precision). d and d^2 are summed in
// the input's compute precision in vector lanes for at least kFlush values of a channel (whole
// (N, C, S) runs of S values; kFlushRows rows of (M, C)), then added into double.
// If a channel's result is not finite, it is recomputed exactly, two passes in double (float32
// values near 1e30 square to infinity in float but not in double); if it is still not finite the
// input holds NaN or Inf, and the caller's guard sees it.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace batchnorm::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 32768;     // values per task (torch's own grain size)
// (N, C, S): a channel's runs of S values are summed in compute-precision lanes until at least
// kFlush values are pending (a run longer than that is summed whole), then added into double
constexpr int64_t kFlush = 4096;
constexpr int64_t kFlushRows = 256;   // rows of (M, C) summed in compute-precision lanes likewise
constexpr int64_t kShiftValues = 16;  // values averaged into a channel's shift

// Reading and writing one vector of T in its compute precision (float, or double for double).
template <typename T>
struct IO {
  using A = Acc<T>;
  using V = Vectorized<A>;
  static V load(const T* p) { return V::loadu(p); }
  static void store(T* p, const V& v) { v.store(p); }
};
template <typename R>
struct ReducedIO {  // Half, BFloat16: V::size() values converted to float on load, back on store
  using A = float;
  using V = Vectorized<float>;
  static V load(const R* p) {
    V v;
    at::vec::load_to_float<R>(p, v);
    return v;
  }
  static void store(R* p, const V& v) {
    at::vec::convert_from_float<R>(v, v).store(p, V::size());
  }
};
template <>
struct IO<c10::Half> : ReducedIO<c10::Half> {};
template <>
struct IO<c10::BFloat16> : ReducedIO<c10::BFloat16> {};

// Non-temporal stores for large float32 outputs: a written line goes to memory without being
// read first (a normal store reads the line before writing it, one third more traffic). Only for
// outputs far larger than the caches (the next layer would read them from memory anyway), in the
// (N, C, S) layout from the first vector-aligned element of each run on (64 bytes with AVX512,
// 32 with AVX2; the head uses plain stores), in the (M, C) layout when every row starts aligned.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T>
bool streaming(const Layout& L, const T* y) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t W = Vectorized<float>::size();
  if (!std::is_same_v<T, float> || L.N * L.C * L.S * int64_t(sizeof(T)) < kStreamBytes) {
    return false;
  }
  if (L.rows) {  // (M, C): every row starts aligned when C is a multiple of the vector width
    return L.C % W == 0 && reinterpret_cast<uintptr_t>(y) % (W * sizeof(float)) == 0;
  }
  return L.S >= 4 * W && reinterpret_cast<uintptr_t>(y) % sizeof(float) == 0;
#else
  return false;
#endif
}

template <typename T, typename V>
void store_streaming(T* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v);
#endif
}

// How many of the S values of a run starting at out come before its first vector-aligned
// element (they get plain stores).
template <typename T>
int64_t aligned_head(const T* out, int64_t S) {
  constexpr int64_t bytes = Vectorized<float>::size() * int64_t(sizeof(float));
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % bytes);
  return std::min<int64_t>(S, misaligned == 0 ? 0 : (bytes - misaligned) / int64_t(sizeof(T)));
}

void fence_streaming() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // the streamed lines are visible before the kernel returns
#endif
}

template <typename V>
double horizontal_sum(const V& v) {
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  double total = 0;
  for (int64_t i = 0; i < V::size(); ++i) total += lanes[i];
  return total;
}

// Sums of d and d * d: two vector accumulators each (two dependency chains), a scalar one for
// tails, and the double totals they are flushed into.
template <typename T>
struct ShiftedSums {
  using A = Acc<T>;
  using V = typename IO<T>::V;
  V s0{A(0)}, s1{A(0)}, q0{A(0)}, q1{A(0)};
  A s_tail = 0, q_tail = 0;
  double sum = 0, sum_sq = 0;

  void add(const V& d0, const V& d1) {
    s0 += d0;
    s1 += d1;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
  }
  void add(const V& d) {
    s0 += d;
    q0 = at::vec::fmadd(d, d, q0);
  }
  void add(A d) {
    s_tail += d;
    q_tail += d * d;
  }
  void flush() {
    sum += horizontal_sum(s0 + s1) + s_tail;
    sum_sq += horizontal_sum(q0 + q1) + q_tail;
    s0 = s1 = q0 = q1 = V(A(0));
    s_tail = q_tail = 0;
  }
};

// mean and M2 from shifted sums: mean = shift + sum / n, M2 = sum_sq - sum^2 / n (not below 0;
// NaN stays NaN).
void finish_moments(double shift, double sum, double sum_sq, int64_t n, double& mean,
                    double& m2) {
  const double mean_shifted = sum / static_cast<double>(n);
  mean = shift + mean_shifted;
  m2 = sum_sq - sum * mean_shifted;
  if (m2 < 0) m2 = 0;
}

bool finite(double mean, double m2) { return std::isfinite(mean) && std::isfinite(m2); }

// Calls f(offset) for every value of channel c of an (N, C, S) tensor, in memory order.
template <typename F>
void each_value_of_channel(const Layout& L, int64_t c, F f) {
  for (int64_t i = 0; i < L.N; ++i) {
    const int64_t base = (i * L.C + c) * L.S;
    for (int64_t s = 0; s < L.S; ++s) f(base + s);
  }
}

// Exact two-pass mean and M2 in double over the values visited by `each` (the rescue path).
template <typename T, typename Each>
void exact_moments(const T* x, int64_t n, Each each, double& mean, double& m2) {
  double sum = 0;
  each([&](int64_t i) { sum += static_cast<double>(x[i]); });
  mean = sum / static_cast<double>(n);
  double sq = 0;
  each([&](int64_t i) {
    const double d = static_cast<double>(x[i]) - mean;
    sq += d * d;
  });
  m2 = sq;
}

// ---------------------------------------------------------------------------------------------
// (N, C, S): one channel at a time
// ---------------------------------------------------------------------------------------------

template <typename T>
void channel_moments(const T* x, const Layout& L, int64_t c, double& mean, double& m2) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  constexpr int64_t W = V::size();
  const T* first = x + c * L.S;
  const int64_t k = std::min(L.S, kShiftValues);
  double shift_sum = 0;
  for (int64_t i = 0; i < k; ++i) shift_sum += static_cast<double>(first[i]);
  const A shift = static_cast<A>(shift_sum / static_cast<double>(k));
  const V vshift(shift);
  ShiftedSums<T> sums;
  int64_t pending = 0;
  for (int64_t i = 0; i < L.N; ++i) {
    const T* row = x + (i * L.C + c) * L.S;
    int64_t s = 0;
    for (; s + 2 * W <= L.S; s += 2 * W) {
      sums.add(io::load(row + s) - vshift, io::load(row + s + W) - vshift);
    }
    for (; s + W <= L.S; s += W) sums.add(io::load(row + s) - vshift);
    for (; s < L.S; ++s) sums.add(static_cast<A>(row[s]) - shift);
    pending += L.S;
    if (pending >= kFlush) {
      sums.flush();
      pending = 0;
    }
  }
  sums.flush();
  finish_moments(shift, sums.sum, sums.sum_sq, L.count(), mean, m2);
  if (!finite(mean, m2)) {
    exact_moments(x, L.count(), [&](auto f) { each_value_of_channel(L, c, f); }, mean, m2);
  }
}

// y = (x - mean) * scale + shift [+ residual] [ReLU] over channel c.
template <typename T, bool kResidual, bool kRelu>
void channel_elemt(const T* x, const T* residual, T* y, const Layout& L, int64_t c, Acc<T> mean,
                   Acc<T> scale, Acc<T> shift) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  constexpr int64_t W = V::size();
  const V vmean(mean), vscale(scale), vshift(shift), zero(A(0));
  const bool stream = streaming(L, y);
  for (int64_t i = 0; i < L.N; ++i) {
    const int64_t base = (i * L.C + c) * L.S;
    int64_t s = 0;
    const int64_t head = stream ? aligned_head(y + base, L.S) : 0;
    for (; s < head; ++s) {
      A v = (static_cast<A>(x[base + s]) - mean) * scale + shift;
      if constexpr (kResidual) v += static_cast<A>(residual[base + s]);
      if constexpr (kRelu) v = v < 0 ? A(0) : v;
      y[base + s] = static_cast<T>(v);
    }
    for (; s + W <= L.S; s += W) {
      V v = at::vec::fmadd(io::load(x + base + s) - vmean, vscale, vshift);
      if constexpr (kResidual) v = v + io::load(residual + base + s);
      if constexpr (kRelu) v = at::vec::maximum(v, zero);
      if (stream) {
        store_streaming(y + base + s, v);
      } else {
        io::store(y + base + s, v);
      }
    }
    for (; s < L.S; ++s) {
      A v = (static_cast<A>(x[base + s]) - mean) * scale + shift;
      if constexpr (kResidual) v += static_cast<A>(residual[base + s]);
      if constexpr (kRelu) v = v < 0 ? A(0) : v;  // NaN stays NaN, as torch.relu
      y[base + s] = static_cast<T>(v);
    }
  }
  if (stream) fence_streaming();
}

// Short runs (S < kShortRun, e.g. the 7x7 and 14x14 maps): channel_elemt's vectors start at each
// run, so with S = 49 most of them straddle cache lines and every run ends in scalar values
// (measured: eval of 16x2048x7x7 11% slower than a copy). short_runs_elemt takes the tensor as
// its N * C runs back to back: a task is a range of runs, one contiguous span of memory (as a
// copy splits it), walked in vectors aligned to the output; a vector that crosses from one
// run into the next takes its constants lane by lane (a blend).
constexpr int64_t kShortRun = 256;

template <typename T, bool kResidual, bool kRelu>
void short_runs_elemt(const T* x, const T* residual, T* y, const Layout& L, int64_t run0,
                      int64_t run1, const Acc<T>* mean, const Acc<T>* scale, const Acc<T>* shift) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  constexpr int64_t W = V::size();
  const int64_t S = L.S, C = L.C;  // W <= S: a vector crosses at most one run boundary
  const V lane = V::arange(A(0), A(1)), zero(A(0));
  const bool stream = streaming(L, y);
  auto scalar = [&](int64_t i, int64_t c) {
    A v = (static_cast<A>(x[i]) - mean[c]) * scale[c] + shift[c];
    if constexpr (kResidual) v += static_cast<A>(residual[i]);
    if constexpr (kRelu) v = v < 0 ? A(0) : v;  // NaN stays NaN, as torch.relu
    y[i] = static_cast<T>(v);
  };
  const int64_t begin = run0 * S, end = run1 * S;
  int64_t i = begin, c = run0 % C, pos = 0;  // the next value: its channel, its place in the run
  auto advance = [&]() {  // one value on
    if (++pos == S) pos = 0, c = c + 1 == C ? 0 : c + 1;
  };
  const int64_t head = aligned_head(y + begin, end - begin);  // < W <= S: within the first run
  for (; i < begin + head; ++i) {
    scalar(i, c);
    advance();
  }
  V m(mean[c]), k(scale[c]), b(shift[c]);
  for (; i + W <= end; i += W) {
    V vm = m, vk = k, vb = b;
    const int64_t left = S - pos;  // values of channel c from i on
    if (left > W) {
      pos += W;
    } else {  // the vector ends this run (at lane `left`); the next run is channel c + 1
      c = c + 1 == C ? 0 : c + 1;
      pos = W - left;
      m = V(mean[c]), k = V(scale[c]), b = V(shift[c]);
      if (left < W) {
        const V first = lane < V(A(left));  // lanes still in the previous run
        vm = V::blendv(m, vm, first);
        vk = V::blendv(k, vk, first);
        vb = V::blendv(b, vb, first);
      }
    }
    V v = at::vec::fmadd(io::load(x + i) - vm, vk, vb);
    if constexpr (kResidual) v = v + io::load(residual + i);
    if constexpr (kRelu) v = at::vec::maximum(v, zero);
    if (stream) {
      store_streaming(y + i, v);
    } else {
      io::store(y + i, v);
    }
  }
  for (; i < end; ++i) {
    scalar(i, c);
    advance();
  }
  if (stream) fence_streaming();
}

// dy where the fused ReLU passed the value (output > 0), 0 elsewhere.
template <typename V>
V masked(const V& dy, const V& output) {
  return V::blendv(V(0), dy, output > V(0));
}

// sum(dy) and sum(dy * (x - mean)) over channel c, dy masked when kMask.
template <typename T, bool kMask>
void channel_grad_sums(const T* dy, const T* x, const T* output, const Layout& L, int64_t c,
                       Acc<T> mean, double& sum_dy, double& sum_dy_xmu) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  constexpr int64_t W = V::size();
  const V vmean(mean);
  V s0(A(0)), s1(A(0));
  A s_tail = 0, p_tail = 0;
  double total_dy = 0, total_dy_xmu = 0;
  int64_t pending = 0;
  for (int64_t i = 0; i < L.N; ++i) {
    const int64_t base = (i * L.C + c) * L.S;
    int64_t s = 0;
    for (; s + W <= L.S; s += W) {
      V g = io::load(dy + base + s);
      if constexpr (kMask) g = masked(g, io::load(output + base + s));
      s0 += g;
      s1 = at::vec::fmadd(g, io::load(x + base + s) - vmean, s1);
    }
    for (; s < L.S; ++s) {
      A g = static_cast<A>(dy[base + s]);
      if constexpr (kMask) g = static_cast<A>(output[base + s]) > 0 ? g : A(0);
      s_tail += g;
      p_tail += g * (static_cast<A>(x[base + s]) - mean);
    }
    pending += L.S;
    if (pending >= kFlush || i == L.N - 1) {
      total_dy += horizontal_sum(s0) + s_tail;
      total_dy_xmu += horizontal_sum(s1) + p_tail;
      s0 = s1 = V(A(0));
      s_tail = p_tail = 0;
      pending = 0;
    }
  }
  sum_dy = total_dy;
  sum_dy_xmu = total_dy_xmu;
}

// dx = dy * k + c1 - (x - mean) * c2 over channel c, dy masked when kMask.
template <typename T, bool kMask>
void channel_grad_input(const T* dy, const T* x, const T* output, T* dx, const Layout& L,
                        int64_t c, Acc<T> mean, Acc<T> k, Acc<T> c1, Acc<T> c2) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  constexpr int64_t W = V::size();
  const V vmean(mean), vk(k), vc1(c1), vc2(c2);
  const bool stream = streaming(L, dx);
  for (int64_t i = 0; i < L.N; ++i) {
    const int64_t base = (i * L.C + c) * L.S;
    int64_t s = 0;
    const int64_t head = stream ? aligned_head(dx + base, L.S) : 0;
    for (; s < head; ++s) {
      A g = static_cast<A>(dy[base + s]);
      if constexpr (kMask) g = static_cast<A>(output[base + s]) > 0 ? g : A(0);
      dx[base + s] = static_cast<T>(g * k + c1 - (static_cast<A>(x[base + s]) - mean) * c2);
    }
    for (; s + W <= L.S; s += W) {
      V g = io::load(dy + base + s);
      if constexpr (kMask) g = masked(g, io::load(output + base + s));
      const V v = at::vec::fmadd(g, vk, vc1) - (io::load(x + base + s) - vmean) * vc2;
      if (stream) {
        store_streaming(dx + base + s, v);
      } else {
        io::store(dx + base + s, v);
      }
    }
    for (; s < L.S; ++s) {
      A g = static_cast<A>(dy[base + s]);
      if constexpr (kMask) g = static_cast<A>(output[base + s]) > 0 ? g : A(0);
      dx[base + s] = static_cast<T>(g * k + c1 - (static_cast<A>(x[base + s]) - mean) * c2);
    }
  }
  if (stream) fence_streaming();
}

// ---------------------------------------------------------------------------------------------
// (M, C): ranges of rows
// ---------------------------------------------------------------------------------------------

// Two per-channel sums over rows, in lanes of the compute precision for up to kFlushRows rows,
// then added into the caller's doubles (so float32 rounding never accumulates over many rows).
template <typename A>
struct RowSums {
  std::vector<A> first, second;
  double* total_first;
  double* total_second;
  int64_t pending = 0;

  RowSums(int64_t C, double* a, double* b)
      : first(C, A(0)), second(C, A(0)), total_first(a), total_second(b) {}
  void flush() {
    for (size_t c = 0; c < first.size(); ++c) {
      total_first[c] += first[c];
      total_second[c] += second[c];
      first[c] = second[c] = A(0);
    }
    pending = 0;
  }
  void row_done() {
    if (++pending == kFlushRows) flush();
  }
};

// Walks rows [r0, r1) in tiles of whole rows small enough for the L1 cache; within a tile, a
// block of channels at a time keeps its lanes in registers across the tile's rows (loaded from
// and stored back to `lanes` once per tile, not once per row). f(r, c) gives the vector pair
// (p, q) at row r, channels [c, c + W) and s(r, c) the scalar pair; first += p, second += p * q
// (a fused multiply-add in vectors). Each channel's lane sees the same additions in the same
// order as a row-by-row walk, and is flushed into double every kFlushRows rows likewise.
constexpr int64_t kTileBytes = 32768;

// Channels [c, c + NB * W) over rows [t0, t1), the lanes in registers.
template <int64_t NB, typename V, typename A, typename VecF>
inline void row_sums_block(int64_t c, int64_t t0, int64_t t1, A* first, A* second, VecF& f) {
  constexpr int64_t W = V::size();
  V p[NB], q[NB];
  for (int64_t j = 0; j < NB; ++j) {
    p[j] = V::loadu(first + c + j * W);
    q[j] = V::loadu(second + c + j * W);
  }
  for (int64_t r = t0; r < t1; ++r) {
    for (int64_t j = 0; j < NB; ++j) {
      const auto [a, b] = f(r, c + j * W);
      p[j] = p[j] + a;
      q[j] = at::vec::fmadd(a, b, q[j]);
    }
  }
  for (int64_t j = 0; j < NB; ++j) {
    p[j].store(first + c + j * W);
    q[j].store(second + c + j * W);
  }
}

template <typename T, typename A, typename VecF, typename ScalarF>
void tiled_row_sums(int64_t C, int64_t r0, int64_t r1, RowSums<A>& lanes, VecF f, ScalarF s) {
  using V = typename IO<T>::V;
  constexpr int64_t W = V::size();
  const int64_t row_bytes = std::max<int64_t>(1, C * int64_t(sizeof(T)));
  const int64_t tile = std::clamp<int64_t>(kTileBytes / row_bytes, 1, kFlushRows);
  A* first = lanes.first.data();
  A* second = lanes.second.data();
  for (int64_t a = r0; a < r1; a += kFlushRows) {
    const int64_t chunk_end = std::min(r1, a + kFlushRows);
    for (int64_t t0 = a; t0 < chunk_end; t0 += tile) {
      const int64_t t1 = std::min(chunk_end, t0 + tile);
      int64_t c = 0;
      for (; c + 4 * W <= C; c += 4 * W) row_sums_block<4, V>(c, t0, t1, first, second, f);
      if (c + 2 * W <= C) {
        row_sums_block<2, V>(c, t0, t1, first, second, f);
        c += 2 * W;
      }
      if (c + W <= C) {
        row_sums_block<1, V>(c, t0, t1, first, second, f);
        c += W;
      }
      // the last channels, fewer than W: row by row, each channel its own chain
      for (int64_t r = t0; r < t1; ++r) {
        for (int64_t i = c; i < C; ++i) {
          const auto [a0, b0] = s(r, i);
          first[i] += a0;
          second[i] += a0 * b0;
        }
      }
    }
    lanes.flush();
  }
}

// Adds the shifted sums of rows [r0, r1) into sum / sum_sq (C doubles each).
template <typename T>
void rows_moments(const T* x, int64_t C, int64_t r0, int64_t r1, const Acc<T>* shift,
                  double* sum, double* sum_sq) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  RowSums<A> lanes(C, sum, sum_sq);
  tiled_row_sums<T>(C, r0, r1, lanes,
      [&](int64_t r, int64_t c) {
        const V d = io::load(x + r * C + c) - V::loadu(shift + c);
        return std::pair<V, V>(d, d);
      },
      [&](int64_t r, int64_t c) {
        const A d = static_cast<A>(x[r * C + c]) - shift[c];
        return std::pair<A, A>(d, d);
      });
}

// Runs f(r0, r1, partial) over row ranges of M rows on torch's pool; partial points to the
// calling thread's own zeroed block of `width` doubles. Returns the blocks summed.
template <typename F>
std::vector<double> reduce_rows(int64_t M, int64_t C, int64_t width, F f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1));
  const int64_t threads = at::get_num_threads();
  std::vector<double> partials(threads * width, 0.0);
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    f(r0, r1, partials.data() + at::get_thread_num() * width);
  });
  std::vector<double> total(width, 0.0);
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t j = 0; j < width; ++j) total[j] += partials[t * width + j];
  }
  return total;
}

template <typename F>
void each_row_range(int64_t M, int64_t C, F f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1));
  at::parallel_for(0, M, grain, f);
}

// Per-channel mean and M2 of an (M, C) tensor, as doubles.
template <typename T>
void rows_stats(const T* x, const Layout& L, std::vector<double>& mean, std::vector<double>& m2) {
  using A = Acc<T>;
  const int64_t M = L.rows_count(), C = L.C;
  const int64_t k = std::min(M, kShiftValues);
  // The shift: the mean of the first k rows, summed row by row (each channel's sum in the same
  // order as a column walk, but C independent sums at a time instead of one dependent chain).
  // A block of kShiftBlock channels keeps its sums in registers across the k rows.
  constexpr int64_t kShiftBlock = 32;
  std::vector<double> first_rows(C, 0.0);
  int64_t c_end = 0;
  for (; c_end + kShiftBlock <= C; c_end += kShiftBlock) {
    using VD = Vectorized<double>;
    constexpr int64_t kV = kShiftBlock / VD::size();
    VD acc[kV];
    for (int64_t j = 0; j < kV; ++j) acc[j] = VD(0.0);
    for (int64_t r = 0; r < k; ++r) {
      const T* row = x + r * C + c_end;
      alignas(64) double values[kShiftBlock];
      for (int64_t i = 0; i < kShiftBlock; ++i) values[i] = static_cast<double>(row[i]);
      for (int64_t j = 0; j < kV; ++j) acc[j] = acc[j] + VD::loadu(values + j * VD::size());
    }
    for (int64_t j = 0; j < kV; ++j) acc[j].store(first_rows.data() + c_end + j * VD::size());
  }
  for (int64_t r = 0; r < k; ++r) {
    const T* row = x + r * C;
    for (int64_t c = c_end; c < C; ++c) first_rows[c] += static_cast<double>(row[c]);
  }
  std::vector<A> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<A>(first_rows[c] / static_cast<double>(k));
  const std::vector<double> sums = reduce_rows(M, C, 2 * C, [&](int64_t r0, int64_t r1,
                                                                 double* partial) {
    rows_moments(x, C, r0, r1, shift.data(), partial, partial + C);
  });
  mean.resize(C);
  m2.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    finish_moments(shift[c], sums[c], sums[C + c], M, mean[c], m2[c]);
  }
  for (int64_t c = 0; c < C; ++c) {
    if (!finite(mean[c], m2[c])) {
      auto column = [&](auto f) {
        for (int64_t r = 0; r < M; ++r) f(r * C + c);
      };
      exact_moments(x, M, column, mean[c], m2[c]);
    }
  }
}

template <typename T, bool kResidual, bool kRelu>
void rows_elemt(const T* x, const T* residual, T* y, int64_t C, int64_t r0, int64_t r1,
                const Acc<T>* mean, const Acc<T>* scale, const Acc<T>* shift, bool stream) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  constexpr int64_t W = V::size();
  const V zero(A(0));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * C;
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      V v = at::vec::fmadd(io::load(x + base + c) - V::loadu(mean + c), V::loadu(scale + c),
                           V::loadu(shift + c));
      if constexpr (kResidual) v = v + io::load(residual + base + c);
      if constexpr (kRelu) v = at::vec::maximum(v, zero);
      if (stream) {
        store_streaming(y + base + c, v);
      } else {
        io::store(y + base + c, v);
      }
    }
    for (; c < C; ++c) {
      A v = (static_cast<A>(x[base + c]) - mean[c]) * scale[c] + shift[c];
      if constexpr (kResidual) v += static_cast<A>(residual[base + c]);
      if constexpr (kRelu) v = v < 0 ? A(0) : v;
      y[base + c] = static_cast<T>(v);
    }
  }
  if (stream) fence_streaming();
}

// Adds sum(dy) and sum(dy * (x - mean)) of rows [r0, r1) into sum_dy / sum_dy_xmu.
template <typename T, bool kMask>
void rows_grad_sums(const T* dy, const T* x, const T* output, int64_t C, int64_t r0, int64_t r1,
                    const Acc<T>* mean, double* sum_dy, double* sum_dy_xmu) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  RowSums<A> lanes(C, sum_dy, sum_dy_xmu);
  tiled_row_sums<T>(C, r0, r1, lanes,
      [&](int64_t r, int64_t c) {
        V g = io::load(dy + r * C + c);
        if constexpr (kMask) g = masked(g, io::load(output + r * C + c));
        return std::pair<V, V>(g, io::load(x + r * C + c) - V::loadu(mean + c));
      },
      [&](int64_t r, int64_t c) {
        A g = static_cast<A>(dy[r * C + c]);
        if constexpr (kMask) g = static_cast<A>(output[r * C + c]) > 0 ? g : A(0);
        return std::pair<A, A>(g, static_cast<A>(x[r * C + c]) - mean[c]);
      });
}

template <typename T, bool kMask>
void rows_grad_input(const T* dy, const T* x, const T* output, T* dx, int64_t C, int64_t r0,
                     int64_t r1, const Acc<T>* mean, const Acc<T>* k, const Acc<T>* c1,
                     const Acc<T>* c2, bool stream) {
  using A = Acc<T>;
  using io = IO<T>;
  using V = typename io::V;
  constexpr int64_t W = V::size();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * C;
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      V g = io::load(dy + base + c);
      if constexpr (kMask) g = masked(g, io::load(output + base + c));
      const V v = at::vec::fmadd(g, V::loadu(k + c), V::loadu(c1 + c)) -
                  (io::load(x + base + c) - V::loadu(mean + c)) * V::loadu(c2 + c);
      if (stream) {
        store_streaming(dx + base + c, v);
      } else {
        io::store(dx + base + c, v);
      }
    }
    for (; c < C; ++c) {
      A g = static_cast<A>(dy[base + c]);
      if constexpr (kMask) g = static_cast<A>(output[base + c]) > 0 ? g : A(0);
      dx[base + c] =
          static_cast<T>(g * k[c] + c1[c] - (static_cast<A>(x[base + c]) - mean[c]) * c2[c]);
    }
  }
  if (stream) fence_streaming();
}

// Channels per task for (N, C, S): enough values per task to pay for a thread hand-off.
int64_t channel_grain(const Layout& L) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(L.count(), 1));
}

// Calls f(std::bool_constant<a>, std::bool_constant<b>) with the flags as compile-time values.
template <typename F>
void with_flags(bool a, bool b, F f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

// invstd * weight, the gradient's per-channel factors: dx = dy * k + c1 - (x - mean) * c2 with
// k = invstd * w, c1 = -k * mean_dy, c2 = k * invstd * mean_dy_xhat.
struct GradFactors {
  double k, c1, c2;
};
GradFactors grad_factors(double invstd, double w, double mean_dy, double mean_dy_xhat) {
  const double k = invstd * w;
  return {k, -k * mean_dy, k * invstd * mean_dy_xhat};
}

// dx of every value: each channel's factors from grad_factors, means(c) giving its (mean_dy,
// mean_dy_xhat) in double, then one pass over the rows or the channels.
template <typename T, bool kMask, typename Means>
void grad_input(const T* dy, const T* x, const T* output, T* dx, const Layout& L,
                const Acc<T>* mean, const Acc<T>* invstd, const Acc<T>* weight, Means means) {
  using A = Acc<T>;
  const int64_t C = L.C;
  std::vector<A> k(C), c1(C), c2(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto [mean_dy, mean_dy_xhat] = means(c);
    const GradFactors g = grad_factors(invstd[c], weight ? weight[c] : 1.0, mean_dy,
                                       mean_dy_xhat);
    k[c] = static_cast<A>(g.k);
    c1[c] = static_cast<A>(g.c1);
    c2[c] = static_cast<A>(g.c2);
  }
  if (L.rows) {
    each_row_range(L.rows_count(), C, [&](int64_t r0, int64_t r1) {
      rows_grad_input<T, kMask>(dy, x, output, dx, C, r0, r1, mean, k.data(), c1.data(),
                                c2.data(), streaming(L, dx));
    });
    return;
  }
  at::parallel_for(0, C, channel_grain(L), [&](int64_t c0, int64_t c1_) {
    for (int64_t c = c0; c < c1_; ++c) {
      channel_grad_input<T, kMask>(dy, x, output, dx, L, c, mean[c], k[c], c1[c], c2[c]);
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The interface (kernels.h)
// ---------------------------------------------------------------------------------------------

template <typename T>
void stats(const T* x, const Layout& L, Acc<T>* mean, Acc<T>* m2) {
  using A = Acc<T>;
  if (L.count() == 0) {  // an empty rank of SyncBatchNorm: count 0 contributes nothing
    std::fill(mean, mean + L.C, A(0));
    std::fill(m2, m2 + L.C, A(0));
    return;
  }
  if (L.rows) {
    std::vector<double> mean_d, m2_d;
    rows_stats(x, L, mean_d, m2_d);
    for (int64_t c = 0; c < L.C; ++c) {
      mean[c] = static_cast<A>(mean_d[c]);
      m2[c] = static_cast<A>(m2_d[c]);
    }
    return;
  }
  at::parallel_for(0, L.C, channel_grain(L), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double mean_d, m2_d;
      channel_moments(x, L, c, mean_d, m2_d);
      mean[c] = static_cast<A>(mean_d);
      m2[c] = static_cast<A>(m2_d);
    }
  });
}

template <typename T>
void elemt(const T* x, const T* residual, T* y, const Layout& L, const Acc<T>* mean,
           const Acc<T>* scale, const Acc<T>* shift, bool relu) {
  with_flags(residual != nullptr, relu, [&](auto has_residual, auto has_relu) {
    constexpr bool kRes = decltype(has_residual)::value, kRelu = decltype(has_relu)::value;
    if (L.rows) {
      each_row_range(L.rows_count(), L.C, [&](int64_t r0, int64_t r1) {
        rows_elemt<T, kRes, kRelu>(x, residual, y, L.C, r0, r1, mean, scale, shift,
                                   streaming(L, y));
      });
      return;
    }
    if (L.S >= IO<T>::V::size() && L.S < kShortRun) {
      at::parallel_for(0, L.N * L.C, std::max<int64_t>(1, kGrain / L.S),
                       [&](int64_t run0, int64_t run1) {
        short_runs_elemt<T, kRes, kRelu>(x, residual, y, L, run0, run1, mean, scale, shift);
      });
      return;
    }
    at::parallel_for(0, L.C, channel_grain(L), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        channel_elemt<T, kRes, kRelu>(x, residual, y, L, c, mean[c], scale[c], shift[c]);
      }
    });
  });
}

// The square root and the division are the cost (scalar, ~3 ns a channel: 5.7 us at C = 2048,
// as much as a 16x2048x7x7 eval pays over a copy); in vectors of doubles, chunk by chunk.
template <typename A>
void eval_factors(const A* var, const A* weight, const A* bias, double eps, int64_t C, A* scale,
                  A* shift) {
  using VD = Vectorized<double>;
  constexpr int64_t kChunk = 16 * VD::size();
  double invstd[kChunk];
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    for (int64_t i = 0; i < n; ++i) invstd[i] = static_cast<double>(var[c0 + i]) + eps;
    int64_t i = 0;
    for (; i + VD::size() <= n; i += VD::size()) {
      VD::loadu(invstd + i).sqrt().reciprocal().store(invstd + i);
    }
    for (; i < n; ++i) invstd[i] = 1.0 / std::sqrt(invstd[i]);
    for (i = 0; i < n; ++i) {
      const A k = static_cast<A>(invstd[i]);
      scale[c0 + i] = weight ? k * weight[c0 + i] : k;
      shift[c0 + i] = bias ? bias[c0 + i] : A(0);
    }
  }
}

template <typename T>
void backward_reduce(const T* dy, const T* x, const T* output, const Layout& L,
                     const Acc<T>* mean, const Acc<T>* invstd, Acc<T>* sum_dy,
                     Acc<T>* sum_dy_xhat) {
  using A = Acc<T>;
  with_flags(output != nullptr, false, [&](auto has_mask, auto) {
    constexpr bool kMask = decltype(has_mask)::value;
    if (L.rows) {
      const int64_t C = L.C;
      const std::vector<double> sums = reduce_rows(L.rows_count(), C, 2 * C,
                                                   [&](int64_t r0, int64_t r1, double* partial) {
        rows_grad_sums<T, kMask>(dy, x, output, C, r0, r1, mean, partial, partial + C);
      });
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] = static_cast<A>(sums[c]);
        sum_dy_xhat[c] = static_cast<A>(sums[C + c] * invstd[c]);
      }
      return;
    }
    at::parallel_for(0, L.C, channel_grain(L), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s_dy, s_dy_xmu;
        channel_grad_sums<T, kMask>(dy, x, output, L, c, mean[c], s_dy, s_dy_xmu);
        sum_dy[c] = static_cast<A>(s_dy);
        sum_dy_xhat[c] = static_cast<A>(s_dy_xmu * invstd[c]);
      }
    });
  });
}

template <typename T>
void backward_elemt(const T* dy, const T* x, const T* output, T* dx, const Layout& L,
                    const Acc<T>* mean, const Acc<T>* invstd, const Acc<T>* weight,
                    const Acc<T>* mean_dy, const Acc<T>* mean_dy_xhat) {
  with_flags(output != nullptr, false, [&](auto has_mask, auto) {
    constexpr bool kMask = decltype(has_mask)::value;
    grad_input<T, kMask>(dy, x, output, dx, L, mean, invstd, weight, [&](int64_t c) {
      return std::pair<double, double>(mean_dy[c], mean_dy_xhat[c]);
    });
  });
}

template <typename T>
void forward_train(const T* x, const T* residual, T* y, const Layout& L, const Acc<T>* weight,
                   const Acc<T>* bias, bool relu, double eps, double* mean, double* m2,
                   Acc<T>* invstd) {
  using A = Acc<T>;
  const int64_t n = L.count(), C = L.C;
  auto channel_invstd = [&](double m2_c) { return 1.0 / std::sqrt(m2_c / n + eps); };
  with_flags(residual != nullptr, relu, [&](auto has_residual, auto has_relu) {
    constexpr bool kRes = decltype(has_residual)::value, kRelu = decltype(has_relu)::value;
    if (L.rows) {
      std::vector<double> mean_d, m2_d;
      rows_stats(x, L, mean_d, m2_d);
      std::vector<A> mean_a(C), scale(C), shift(C);
      // 1 / sqrt(m2 / n + eps) in vectors of doubles (correctly rounded like the scalar form)
      using VD = Vectorized<double>;
      std::vector<double> invstd_d(C);
      int64_t c0 = 0;
      for (; c0 + VD::size() <= C; c0 += VD::size()) {
        (VD::loadu(m2_d.data() + c0) / VD(static_cast<double>(n)) + VD(eps))
            .sqrt().reciprocal().store(invstd_d.data() + c0);
      }
      for (; c0 < C; ++c0) invstd_d[c0] = channel_invstd(m2_d[c0]);
      for (int64_t c = 0; c < C; ++c) {
        const double invstd_c = invstd_d[c];
        mean[c] = mean_d[c];
        m2[c] = m2_d[c];
        mean_a[c] = static_cast<A>(mean_d[c]);
        invstd[c] = static_cast<A>(invstd_c);
        scale[c] = static_cast<A>(invstd_c * (weight ? weight[c] : 1.0));
        shift[c] = bias ? bias[c] : A(0);
      }
      each_row_range(L.rows_count(), C, [&](int64_t r0, int64_t r1) {
        rows_elemt<T, kRes, kRelu>(x, residual, y, C, r0, r1, mean_a.data(), scale.data(),
                                   shift.data(), streaming(L, y));
      });
      return;
    }
    at::parallel_for(0, C, channel_grain(L), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double mean_c, m2_c;
        channel_moments(x, L, c, mean_c, m2_c);  // the channel is in cache for the pass below
        const double invstd_c = channel_invstd(m2_c);
        mean[c] = mean_c;
        m2[c] = m2_c;
        invstd[c] = static_cast<A>(invstd_c);
        const A scale = static_cast<A>(invstd_c * (weight ? weight[c] : 1.0));
        channel_elemt<T, kRes, kRelu>(x, residual, y, L, c, static_cast<A>(mean_c), scale,
                                      bias ? bias[c] : A(0));
      }
    });
  });
}

template <typename T>
void backward_train(const T* dy, const T* x, const T* output, T* dx, const Layout& L,
                    const Acc<T>* mean, const Acc<T>* invstd, const Acc<T>* weight,
                    Acc<T>* sum_dy, Acc<T>* sum_dy_xhat) {
  using A = Acc<T>;
  const int64_t C = L.C;
  const double n = static_cast<double>(L.count());
  with_flags(output != nullptr, false, [&](auto has_mask, auto) {
    constexpr bool kMask = decltype(has_mask)::value;
    if (L.rows) {
      const std::vector<double> sums = reduce_rows(L.rows_count(), C, 2 * C,
                                                   [&](int64_t r0, int64_t r1, double* partial) {
        rows_grad_sums<T, kMask>(dy, x, output, C, r0, r1, mean, partial, partial + C);
      });
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] = static_cast<A>(sums[c]);
        sum_dy_xhat[c] = static_cast<A>(sums[C + c] * invstd[c]);
      }
      grad_input<T, kMask>(dy, x, output, dx, L, mean, invstd, weight, [&](int64_t c) {
        return std::pair<double, double>(sums[c] / n, sums[C + c] * invstd[c] / n);
      });
      return;
    }
    at::parallel_for(0, C, channel_grain(L), [&](int64_t c0, int64_t c1_) {
      for (int64_t c = c0; c < c1_; ++c) {
        double s_dy, s_dy_xmu;
        channel_grad_sums<T, kMask>(dy, x, output, L, c, mean[c], s_dy, s_dy_xmu);
        const double s_dy_xhat = s_dy_xmu * invstd[c];
        sum_dy[c] = static_cast<A>(s_dy);
        sum_dy_xhat[c] = static_cast<A>(s_dy_xhat);
        const GradFactors g =
            grad_factors(invstd[c], weight ? weight[c] : 1.0, s_dy / n, s_dy_xhat / n);
        channel_grad_input<T, kMask>(dy, x, output, dx, L, c, mean[c], static_cast<A>(g.k),
                                     static_cast<A>(g.c1), static_cast<A>(g.c2));
      }
    });
  });
}

const char* compiled_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

bool capability_supported() {
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return true;
#endif
}

#define BATCHNORM_INSTANTIATE(T)                                                               \
  template void stats<T>(const T*, const Layout&, Acc<T>*, Acc<T>*);                           \
  template void elemt<T>(const T*, const T*, T*, const Layout&, const Acc<T>*, const Acc<T>*,  \
                         const Acc<T>*, bool);                                                 \
  template void backward_reduce<T>(const T*, const T*, const T*, const Layout&, const Acc<T>*, \
                                   const Acc<T>*, Acc<T>*, Acc<T>*);                           \
  template void backward_elemt<T>(const T*, const T*, const T*, T*, const Layout&,             \
                                  const Acc<T>*, const Acc<T>*, const Acc<T>*, const Acc<T>*,  \
                                  const Acc<T>*);                                              \
  template void forward_train<T>(const T*, const T*, T*, const Layout&, const Acc<T>*,         \
                                 const Acc<T>*, bool, double, double*, double*, Acc<T>*);      \
  template void backward_train<T>(const T*, const T*, const T*, T*, const Layout&,             \
                                  const Acc<T>*, const Acc<T>*, const Acc<T>*, Acc<T>*, Acc<T>*);

template void eval_factors<float>(const float*, const float*, const float*, double, int64_t,
                                 float*, float*);
template void eval_factors<double>(const double*, const double*, const double*, double, int64_t,
                                   double*, double*);

BATCHNORM_INSTANTIATE(float)
BATCHNORM_INSTANTIATE(double)
BATCHNORM_INSTANTIATE(c10::Half)
BATCHNORM_INSTANTIATE(c10::BFloat16)

}  // namespace batchnorm::cpu
