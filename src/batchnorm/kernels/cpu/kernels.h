// The CPU kernels' interface: raw pointers and sizes, no tensors (ops.cpp does the tensor side).
//
// A dense (N, C, *) input is one of two row-major shapes (S = the spatial size):
//   (N, C, S)  contiguous input with S > 1: a channel is N runs of S contiguous values
//   (M, C)     channels-last input (M = N * S rows) and (N, C) / spatial-1x1 input:
//              a row holds one value of every channel
// Per-channel vectors (mean, invstd, weight, ...) are arrays of C values of Acc<T>: double for
// double input, float for float, Half and BFloat16 (read and written natively, summed in float).
// Statistics are totalled in double whatever the input, from partial sums in vector lanes of the
// compute precision (kernels.cpp); a channel whose float sums overflow (values near 1e30) is
// recomputed exactly in double.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace batchnorm::cpu {

struct Layout {
  int64_t N = 0, C = 0, S = 0;
  bool rows = false;  // true: the (M, C) view, channels innermost; false: (N, C, S)
  int64_t count() const { return N * S; }  // values per channel
  int64_t rows_count() const { return N * S; }
};

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using Acc = typename AccType<T>::type;

// Per-channel mean and M2 = sum((x - mean)^2).
template <typename T>
void stats(const T* x, const Layout& L, Acc<T>* mean, Acc<T>* m2);

// y = (x - mean) * scale + shift [+ residual] [ReLU]; scale = invstd * weight, shift = bias.
template <typename T>
void elemt(const T* x, const T* residual, T* y, const Layout& L, const Acc<T>* mean,
           const Acc<T>* scale, const Acc<T>* shift, bool relu);

// Eval's per-channel factors from the running variance: scale = invstd * weight (weight may be
// null: 1), shift = bias (null: 0), invstd = 1 / sqrt(var + eps) in double, rounded to A, as
// `static_cast<A>(1.0 / std::sqrt(double(var) + eps))` (vector square roots and divisions round
// as the scalar ones do: the same bits).
template <typename A>
void eval_factors(const A* var, const A* weight, const A* bias, double eps, int64_t C, A* scale,
                  A* shift);

// sum_dy = sum(dy), sum_dy_xhat = sum(dy * (x - mean)) * invstd; dy masked by output > 0 when
// output is given (a fused ReLU's forward output).
template <typename T>
void backward_reduce(const T* dy, const T* x, const T* output, const Layout& L,
                     const Acc<T>* mean, const Acc<T>* invstd, Acc<T>* sum_dy,
                     Acc<T>* sum_dy_xhat);

// dx = (dy - mean_dy - x_hat * mean_dy_xhat) * invstd * weight, dy masked as above; weight may
// be null (1).
template <typename T>
void backward_elemt(const T* dy, const T* x, const T* output, T* dx, const Layout& L,
                    const Acc<T>* mean, const Acc<T>* invstd, const Acc<T>* weight,
                    const Acc<T>* mean_dy, const Acc<T>* mean_dy_xhat);

// The fused training step: statistics, invstd = 1 / sqrt(m2 / count + eps), and the
// normalize + affine (+ residual, ReLU) pass, channel block by channel block while it is in cache.
// weight / bias may be null (1 and 0). mean and m2 are written in double: float32 data near
// 1e30 have an M2 beyond float32 but normalize fine, and the NaN/Inf guard must not mistake it.
template <typename T>
void forward_train(const T* x, const T* residual, T* y, const Layout& L, const Acc<T>* weight,
                   const Acc<T>* bias, bool relu, double eps, double* mean, double* m2,
                   Acc<T>* invstd);

// The fused backward: backward_reduce, then
// dx = (dy - sum_dy / count - x_hat * sum_dy_xhat / count) * invstd * weight, in one sweep per
// channel block while it is in cache.
template <typename T>
void backward_train(const T* dy, const T* x, const T* output, T* dx, const Layout& L,
                    const Acc<T>* mean, const Acc<T>* invstd, const Acc<T>* weight,
                    Acc<T>* sum_dy, Acc<T>* sum_dy_xhat);

// The CPU capability the kernels were compiled for ("AVX512", "AVX2" or "DEFAULT"), and whether
// this processor can run them.
const char* compiled_capability();
bool capability_supported();

}  // namespace batchnorm::cpu
