// The CPU implementations of the batchnorm:: ops (schemas: ops.py), on the kernels of
// kernels.cpp, and the Python module that registers them for the CPU dispatch key.
//
// This file does the tensor side: argument checks (device, sizes), the two dense layouts the
// kernels read (anything else is made contiguous first), outputs in the input's layout,
// per-channel vectors in the statistics' precision, and the running-statistics update with its
// NaN/Inf guard. Registration happens when Python calls register_kernels(), after checking that
// this processor has the instructions the kernels were compiled for.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace batchnorm::cpu {

void register_autograd(torch::Library& library);  // autograd.cpp: forward_train's C++ node

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

at::ScalarType stat_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_on_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "batchnorm::", op, ": ", name, " is on ", t.device(),
              ", expected cpu like the input: every tensor argument must be on the input's "
              "device");
}

// The input in one of the two dense layouts of kernels.h, with its sizes.
struct Dense {
  Tensor t;
  Layout L;
};

Dense dense(const Tensor& input, const char* op) {
  check_on_cpu(input, op, "input");
  TORCH_CHECK(input.dim() >= 2, "batchnorm::", op, ": expected an input of at least 2 "
              "dimensions (N, C, *), got ", input.dim(), "D input of shape ", input.sizes());
  const int64_t N = input.size(0), C = input.size(1);
  const int64_t S = N * C == 0 ? 0 : input.numel() / (N * C);
  Tensor x = input;
  bool rows = S == 1;  // (N, C) and spatial 1x1: channels innermost when contiguous
  if (!x.is_contiguous()) {
    const bool channels_last =
        (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
        (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
    if (channels_last) {
      rows = true;
    } else {
      x = x.contiguous();
    }
  }
  return {x, Layout{N, C, S, rows}};
}

// ---------------------------------------------------------------------------------------------
// Outputs: a reuse pool (and huge pages for large ones)
// ---------------------------------------------------------------------------------------------
// torch's CPU allocator takes a fresh output from malloc, and for outputs past glibc's mmap and
// trim thresholds (128 KiB at first, moved by the sizes freed) every page of it faults and is
// zeroed before the kernel writes it: measured at a 1 MiB (256, 1024) training step, the faults
// cost more than the kernels (perf: exc_page_fault first). Outputs of kPooledBytes and more are
// therefore blocks of our own, and a freed block is kept for the next output of the same size
// while the pool holds less than BATCHNORM_CPU_POOL_MB (default 256; 0 turns the pool off).
// Blocks of 2 MiB and more are 2 MiB-aligned with transparent huge pages asked for (madvise);
// smaller ones are page-aligned, their size rounded up to whole pages.

constexpr size_t kPooledBytes = size_t(256) << 10;
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kPage = size_t(4) << 10;

// The block size an output of `bytes` takes: whole huge pages from 2 MiB on, else whole pages.
size_t block_bytes(size_t bytes) {
  const size_t unit = bytes >= kHugePage ? kHugePage : kPage;
  return (bytes + unit - 1) / unit * unit;
}

struct OutputPool {
  std::mutex mutex;
  std::unordered_multimap<size_t, void*> free_blocks;
  size_t held = 0;
  size_t limit = 0;

  OutputPool() {
    const char* env = std::getenv("BATCHNORM_CPU_POOL_MB");
    limit = (env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t(256)) << 20;
  }
  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto it = free_blocks.find(bytes);
      if (it != free_blocks.end()) {
        void* block = it->second;
        free_blocks.erase(it);
        held -= bytes;
        return block;
      }
    }
    void* block = nullptr;
    const bool huge = bytes >= kHugePage;
    TORCH_CHECK(posix_memalign(&block, huge ? kHugePage : kPage, bytes) == 0,
                "batchnorm: could not allocate ", bytes, " bytes for an output");
    if (huge) madvise(block, bytes, MADV_HUGEPAGE);  // a hint: without THP the block still works
    return block;
  }
  void release(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (held + bytes <= limit) {
        free_blocks.emplace(bytes, block);
        held += bytes;
        return;
      }
    }
    std::free(block);
  }
};

OutputPool& output_pool() {
  static OutputPool* pool = new OutputPool();  // never destroyed: outputs may outlive exit
  return *pool;
}

// An uninitialized tensor with x's sizes, strides and dtype (x is dense).
Tensor empty_output(const Tensor& x) {
  const size_t bytes = static_cast<size_t>(x.numel()) * x.element_size();
  if (bytes < kPooledBytes) return at::empty_like(x);
  const size_t rounded = block_bytes(bytes);
  void* block = output_pool().acquire(rounded);
  return at::from_blob(block, x.sizes(), x.strides(),
                       [rounded](void* p) { output_pool().release(p, rounded); }, x.options());
}

// t with x's dtype, sizes and strides (a copy only when it differs).
Tensor like(const Tensor& t, const Tensor& x, const char* op, const char* name) {
  check_on_cpu(t, op, name);
  TORCH_CHECK(t.sizes() == x.sizes(), "batchnorm::", op, ": ", name, " must have the input's "
              "shape ", x.sizes(), ", got ", t.sizes());
  if (t.scalar_type() == x.scalar_type() && t.strides() == x.strides()) return t;
  Tensor out = at::empty_like(x);
  out.copy_(t);
  return out;
}

// A per-channel argument as C contiguous values of type A: a pointer into the tensor itself when
// it already is that (no dispatcher call), else into a converted copy kept alive by `keep`.
// nullptr when the argument is absent.
template <typename A>
const A* channel_ptr(const OptTensor& t, int64_t C, Tensor& keep, const char* op,
                     const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_on_cpu(*t, op, name);
  TORCH_CHECK(t->numel() == C, "batchnorm::", op, ": ", name, " must hold one value per "
              "channel (", C, "), got shape ", t->sizes());
  TORCH_CHECK(t->is_floating_point(), "batchnorm::", op, ": ", name, " must be floating point, "
              "got ", t->scalar_type());  // torch refuses the rest; Python no longer checks
  constexpr auto type = c10::CppTypeToScalarType<A>::value;
  if (t->scalar_type() == type && t->is_contiguous()) return t->const_data_ptr<A>();
  keep = t->to(type).contiguous();
  return keep.const_data_ptr<A>();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

Tensor vector_of(int64_t C, const Tensor& like_input) {
  return at::empty({C}, like_input.options().dtype(stat_type(like_input.scalar_type())));
}

// ---------------------------------------------------------------------------------------------
// Running statistics
// ---------------------------------------------------------------------------------------------

// buffer <- buffer + factor * (batch - buffer), computed in double, in the buffer's own memory.
// The write bypasses autograd, so the version counter is bumped by hand: a backward pass that
// saved the buffer (eval mode) must still notice the change.
void lerp_into(Tensor& buffer, const std::vector<double>& batch, double factor) {
  Tensor dense_buffer = buffer.is_contiguous() ? buffer : buffer.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(),
                                  "batchnorm_running_stats", [&] {
    scalar_t* values = dense_buffer.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < batch.size(); ++c) {
      const double current = static_cast<double>(values[c]);
      values[c] = static_cast<scalar_t>(current + factor * (batch[c] - current));
    }
  });
  if (!dense_buffer.is_same(buffer)) buffer.copy_(dense_buffer);
  buffer.unsafeGetTensorImpl()->bump_version();
}

void count_batch(const Tensor& num_batches_tracked) {
  if (num_batches_tracked.scalar_type() == at::kLong && num_batches_tracked.numel() == 1 &&
      num_batches_tracked.is_contiguous()) {
    num_batches_tracked.mutable_data_ptr<int64_t>()[0] += 1;
    num_batches_tracked.unsafeGetTensorImpl()->bump_version();
  } else {
    num_batches_tracked.add_(1);
  }
}

// The one running-statistics update (plain, ghost and renorm batch norm, SyncBatchNorm): returns
// whether the batch's statistics were finite. A batch with NaN or Inf in them leaves the buffers
// and num_batches_tracked unchanged. running_var takes the unbiased m2 / (count - 1) although
// the batch was normalized with the biased m2 / count (the paper's Algorithm 2, and torch).
bool update_running(const OptTensor& running_mean, const OptTensor& running_var,
                    const OptTensor& num_batches_tracked, const std::vector<double>& mean,
                    const std::vector<double>& m2, double count, std::optional<double> momentum,
                    const char* op) {
  bool finite = true;
  for (size_t c = 0; c < mean.size(); ++c) {
    finite = finite && std::isfinite(mean[c]) && std::isfinite(m2[c]);
  }
  const bool has_buffers = running_mean.has_value() && running_mean->defined() &&
                           running_var.has_value() && running_var->defined();
  const bool has_count = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (!has_buffers) {
    if (has_count) count_batch(*num_batches_tracked);  // as torch: counted whatever the values
    return finite;
  }
  if (!finite) return false;
  const int64_t C = static_cast<int64_t>(mean.size());
  for (const auto* buffer : {&*running_mean, &*running_var}) {
    check_on_cpu(*buffer, op, "a running statistic");
    TORCH_CHECK(buffer->numel() == C, "batchnorm::", op, ": running statistics must hold one "
                "value per channel (", C, "), got shape ", buffer->sizes());
    TORCH_CHECK(buffer->is_floating_point(), "batchnorm::", op, ": running statistics must be "
                "floating point, got ", buffer->scalar_type());
  }
  TORCH_CHECK(momentum.has_value() || has_count, "batchnorm::", op, ": momentum=None (a "
              "cumulative average) needs num_batches_tracked");
  if (has_count) count_batch(*num_batches_tracked);
  const double factor = momentum.has_value()
      ? *momentum
      : 1.0 / static_cast<double>(std::max<int64_t>(num_batches_tracked->item<int64_t>(), 1));
  std::vector<double> unbiased(C);
  for (int64_t c = 0; c < C; ++c) unbiased[c] = m2[c] / (count - 1);
  Tensor rm = *running_mean, rv = *running_var;
  lerp_into(rm, mean, factor);
  lerp_into(rv, unbiased, factor);
  return true;
}

std::vector<double> as_doubles(const Tensor& t) {
  Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  return std::vector<double>(p, p + d.numel());
}

Tensor bool_scalar(bool value) {
  Tensor t = at::empty({}, at::TensorOptions().dtype(at::kBool));
  t.mutable_data_ptr<bool>()[0] = value;
  return t;
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

#define BATCHNORM_DISPATCH(input, name, ...)                                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (input).scalar_type(), name,      \
                                  __VA_ARGS__)

Tensor optional_like(const OptTensor& t, const Tensor& x, const char* op, const char* name) {
  return t.has_value() && t->defined() ? like(*t, x, op, name) : Tensor();
}

std::tuple<Tensor, Tensor> stats_cpu(const Tensor& input) {
  const Dense d = dense(input, "stats");
  Tensor mean = vector_of(d.L.C, input), m2 = vector_of(d.L.C, input);
  BATCHNORM_DISPATCH(input, "batchnorm_stats", [&] {
    using A = Acc<scalar_t>;
    stats<scalar_t>(d.t.const_data_ptr<scalar_t>(), d.L, mean.mutable_data_ptr<A>(),
                    m2.mutable_data_ptr<A>());
  });
  return {mean, m2};
}

// y = (x - mean) * scale + shift [+ res] [ReLU] into a new output in x's layout.
template <typename T>
Tensor elemt_into_output(const Dense& d, const Acc<T>* mean, const Acc<T>* scale,
                         const Acc<T>* shift, const Tensor& res, bool relu) {
  Tensor y = empty_output(d.t);
  if (y.numel() == 0) return y;
  elemt<T>(d.t.const_data_ptr<T>(), ptr_or_null<T>(res), y.mutable_data_ptr<T>(), d.L, mean,
           scale, shift, relu);
  return y;
}

Tensor elemt_cpu(const Tensor& input, const Tensor& mean, const Tensor& invstd,
                 const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                 bool relu) {
  const char* op = "elemt";
  const Dense d = dense(input, op);
  const int64_t C = d.L.C;
  const Tensor res = optional_like(residual, d.t, op, "residual");
  Tensor y;
  BATCHNORM_DISPATCH(input, "batchnorm_elemt", [&] {
    using A = Acc<scalar_t>;
    Tensor k0, k1, k2, k3;
    const A* m = channel_ptr<A>(mean, C, k0, op, "mean");
    const A* is = channel_ptr<A>(invstd, C, k1, op, "invstd");
    const A* w = channel_ptr<A>(weight, C, k2, op, "weight");
    const A* b = channel_ptr<A>(bias, C, k3, op, "bias");
    std::vector<A> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w ? is[c] * w[c] : is[c];
      shift[c] = b ? b[c] : A(0);
    }
    y = elemt_into_output<scalar_t>(d, m, scale.data(), shift.data(), res, relu);
  });
  return y;
}

// Eval: the factors straight from the running variance (eval_factors), then elemt.
Tensor forward_eval_cpu(const Tensor& input, const Tensor& running_mean,
                        const Tensor& running_var, const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& residual, bool relu, double eps) {
  const char* op = "forward_eval";
  const Dense d = dense(input, op);
  const int64_t C = d.L.C;
  const Tensor res = optional_like(residual, d.t, op, "residual");
  Tensor y;
  BATCHNORM_DISPATCH(input, "batchnorm_forward_eval", [&] {
    using A = Acc<scalar_t>;
    Tensor k0, k1, k2, k3;
    const A* m = channel_ptr<A>(running_mean, C, k0, op, "running_mean");
    const A* v = channel_ptr<A>(running_var, C, k1, op, "running_var");  // usually in place
    const A* w = channel_ptr<A>(weight, C, k2, op, "weight");
    const A* b = channel_ptr<A>(bias, C, k3, op, "bias");
    std::vector<A> scale(C), shift(C);
    eval_factors<A>(v, w, b, eps, C, scale.data(), shift.data());
    y = elemt_into_output<scalar_t>(d, m, scale.data(), shift.data(), res, relu);
  });
  return y;
}

std::tuple<Tensor, Tensor> backward_reduce_cpu(const Tensor& grad_out, const Tensor& input,
                                               const Tensor& mean, const Tensor& invstd,
                                               const OptTensor& output) {
  const char* op = "backward_reduce";
  const Dense d = dense(input, op);
  const int64_t C = d.L.C;
  const Tensor dy = like(grad_out, d.t, op, "grad_out");
  const Tensor out = optional_like(output, d.t, op, "output");
  Tensor sum_dy = vector_of(C, input), sum_dy_xhat = vector_of(C, input);
  BATCHNORM_DISPATCH(input, "batchnorm_backward_reduce", [&] {
    using A = Acc<scalar_t>;
    Tensor k0, k1;
    const A* m = channel_ptr<A>(mean, C, k0, op, "mean");
    const A* is = channel_ptr<A>(invstd, C, k1, op, "invstd");
    if (d.L.count() == 0) {
      sum_dy.zero_();
      sum_dy_xhat.zero_();
      return;
    }
    backward_reduce<scalar_t>(dy.const_data_ptr<scalar_t>(), d.t.const_data_ptr<scalar_t>(),
                              ptr_or_null<scalar_t>(out), d.L, m, is,
                              sum_dy.mutable_data_ptr<A>(), sum_dy_xhat.mutable_data_ptr<A>());
  });
  return {sum_dy, sum_dy_xhat};
}

Tensor backward_elemt_cpu(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                          const Tensor& invstd, const OptTensor& weight, const Tensor& mean_dy,
                          const Tensor& mean_dy_xhat, const OptTensor& output) {
  const char* op = "backward_elemt";
  const Dense d = dense(input, op);
  const int64_t C = d.L.C;
  const Tensor dy = like(grad_out, d.t, op, "grad_out");
  const Tensor out = optional_like(output, d.t, op, "output");
  Tensor dx = empty_output(d.t);
  BATCHNORM_DISPATCH(input, "batchnorm_backward_elemt", [&] {
    using A = Acc<scalar_t>;
    Tensor k0, k1, k2, k3, k4;
    const A* m = channel_ptr<A>(mean, C, k0, op, "mean");
    const A* is = channel_ptr<A>(invstd, C, k1, op, "invstd");
    const A* w = channel_ptr<A>(weight, C, k2, op, "weight");
    const A* mdy = channel_ptr<A>(mean_dy, C, k3, op, "mean_dy");
    const A* mdx = channel_ptr<A>(mean_dy_xhat, C, k4, op, "mean_dy_xhat");
    if (dx.numel() == 0) return;
    backward_elemt<scalar_t>(dy.const_data_ptr<scalar_t>(), d.t.const_data_ptr<scalar_t>(),
                             ptr_or_null<scalar_t>(out), dx.mutable_data_ptr<scalar_t>(), d.L, m,
                             is, w, mdy, mdx);
  });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_train_cpu(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& residual, bool relu, double eps, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    std::optional<double> momentum) {
  const char* op = "forward_train";
  const Dense d = dense(input, op);
  const int64_t C = d.L.C;
  const Tensor res = optional_like(residual, d.t, op, "residual");
  TORCH_CHECK(d.L.count() > 0, "batchnorm::", op, ": an empty batch has no statistics");
  Tensor y = empty_output(d.t);
  Tensor mean = vector_of(C, input), m2 = vector_of(C, input), invstd = vector_of(C, input);
  std::vector<double> mean_d(C), m2_d(C);
  BATCHNORM_DISPATCH(input, "batchnorm_forward_train", [&] {
    using A = Acc<scalar_t>;
    Tensor k0, k1;
    const A* w = channel_ptr<A>(weight, C, k0, op, "weight");
    const A* b = channel_ptr<A>(bias, C, k1, op, "bias");
    forward_train<scalar_t>(d.t.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(res),
                            y.mutable_data_ptr<scalar_t>(), d.L, w, b, relu, eps, mean_d.data(),
                            m2_d.data(), invstd.mutable_data_ptr<A>());
    A* mp = mean.mutable_data_ptr<A>();
    A* qp = m2.mutable_data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = static_cast<A>(mean_d[c]);
      qp[c] = static_cast<A>(m2_d[c]);
    }
  });
  const bool finite = update_running(running_mean, running_var, num_batches_tracked, mean_d,
                                     m2_d, static_cast<double>(d.L.count()), momentum, op);
  return {y, mean, m2, invstd, bool_scalar(finite)};
}

std::tuple<Tensor, Tensor, Tensor> backward_train_cpu(const Tensor& grad_out,
                                                      const Tensor& input, const Tensor& mean,
                                                      const Tensor& invstd,
                                                      const OptTensor& weight,
                                                      const OptTensor& output) {
  const char* op = "backward_train";
  const Dense d = dense(input, op);
  const int64_t C = d.L.C;
  const Tensor dy = like(grad_out, d.t, op, "grad_out");
  const Tensor out = optional_like(output, d.t, op, "output");
  TORCH_CHECK(d.L.count() > 0, "batchnorm::", op, ": an empty batch has no statistics");
  Tensor dx = empty_output(d.t);
  Tensor sum_dy = vector_of(C, input), sum_dy_xhat = vector_of(C, input);
  BATCHNORM_DISPATCH(input, "batchnorm_backward_train", [&] {
    using A = Acc<scalar_t>;
    Tensor k0, k1, k2;
    const A* m = channel_ptr<A>(mean, C, k0, op, "mean");
    const A* is = channel_ptr<A>(invstd, C, k1, op, "invstd");
    const A* w = channel_ptr<A>(weight, C, k2, op, "weight");
    backward_train<scalar_t>(dy.const_data_ptr<scalar_t>(), d.t.const_data_ptr<scalar_t>(),
                             ptr_or_null<scalar_t>(out), dx.mutable_data_ptr<scalar_t>(), d.L, m,
                             is, w, sum_dy.mutable_data_ptr<A>(),
                             sum_dy_xhat.mutable_data_ptr<A>());
  });
  return {dx, sum_dy, sum_dy_xhat};
}

Tensor update_running_stats_cpu(const Tensor& running_mean, const Tensor& running_var,
                                const OptTensor& num_batches_tracked, const Tensor& mean,
                                const Tensor& m2, const Tensor& count,
                                std::optional<double> momentum) {
  const char* op = "update_running_stats";
  for (const Tensor* t : {&mean, &m2, &count}) check_on_cpu(*t, op, "a batch statistic");
  const bool finite = update_running(running_mean, running_var, num_batches_tracked,
                                     as_doubles(mean), as_doubles(m2), count.item<double>(),
                                     momentum, op);
  return bool_scalar(finite);
}

std::unique_ptr<torch::Library> registration, autograd_registration;

bool register_kernels() {
  if (!capability_supported()) return false;
  if (registration) return true;
  auto library = std::make_unique<torch::Library>(torch::Library::IMPL, "batchnorm",
                                                  c10::DispatchKey::CPU, __FILE__, __LINE__);
  library->impl("stats", TORCH_FN(stats_cpu));
  library->impl("elemt", TORCH_FN(elemt_cpu));
  library->impl("backward_reduce", TORCH_FN(backward_reduce_cpu));
  library->impl("backward_elemt", TORCH_FN(backward_elemt_cpu));
  library->impl("forward_train", TORCH_FN(forward_train_cpu));
  library->impl("backward_train", TORCH_FN(backward_train_cpu));
  library->impl("forward_eval", TORCH_FN(forward_eval_cpu));
  library->impl("update_running_stats", TORCH_FN(update_running_stats_cpu));
  auto autograd = std::make_unique<torch::Library>(torch::Library::IMPL, "batchnorm",
                                                   c10::DispatchKey::AutogradCPU, __FILE__,
                                                   __LINE__);
  register_autograd(*autograd);  // autograd.cpp
  registration = std::move(library);
  autograd_registration = std::move(autograd);
  return true;
}

// ---------------------------------------------------------------------------------------------
// The Python module: batchnorm.kernels.cpu._C
// ---------------------------------------------------------------------------------------------

PyObject* py_register_kernels(PyObject*, PyObject*) {
  try {
    return PyBool_FromLong(register_kernels());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// forward_train(input, weight, bias, residual, relu, eps, running_mean, running_var,
// num_batches_tracked, momentum) -> (output, finite): the op batchnorm::forward_train called
// through the dispatcher (autograd, profiling, dispatch modes apply as ever), without the Python
// op object's overhead (measured: 1.5 us a call more than torch's own bindings) and handing back
// only the two results the training step's caller reads. Arguments of any other kind (a tensor
// subclass, a non-float eps) and an active torch function mode get NotImplemented: the caller
// then calls the op through torch.ops, which handles them.
bool plain_tensor(PyObject* object, OptTensor& tensor) {
  if (object == Py_None) return true;
  if (!THPVariable_CheckExact(object)) return false;
  tensor = THPVariable_Unpack(object);
  return true;
}

PyObject* py_forward_train(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10 || !THPVariable_CheckExact(args[0]) || !PyBool_Check(args[4]) ||
      !PyFloat_CheckExact(args[5]) || (args[9] != Py_None && !PyFloat_CheckExact(args[9])) ||
      at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  OptTensor weight, bias, residual, running_mean, running_var, num_batches_tracked;
  if (!plain_tensor(args[1], weight) || !plain_tensor(args[2], bias) ||
      !plain_tensor(args[3], residual) || !plain_tensor(args[6], running_mean) ||
      !plain_tensor(args[7], running_var) || !plain_tensor(args[8], num_batches_tracked)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const Tensor& input = THPVariable_Unpack(args[0]);
  const bool relu = args[4] == Py_True;
  const double eps = PyFloat_AS_DOUBLE(args[5]);
  const std::optional<double> momentum =
      args[9] == Py_None ? std::nullopt : std::optional<double>(PyFloat_AS_DOUBLE(args[9]));
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("batchnorm::forward_train", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double,
              const OptTensor&, const OptTensor&, const OptTensor&, std::optional<double>)>();
  Tensor output, finite;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own bindings
    auto results = op.call(input, weight, bias, residual, relu, eps, running_mean, running_var,
                           num_batches_tracked, momentum);
    output = std::move(std::get<0>(results));
    finite = std::move(std::get<4>(results));
  }
  PyObject* pair = PyTuple_New(2);
  if (!pair) return nullptr;
  PyTuple_SET_ITEM(pair, 0, THPVariable_Wrap(std::move(output)));
  // The flag as a Python bool where reading it is free (a CPU tensor with data: not under a
  // dispatch mode's fake tensors), which spares the caller a Tensor.item() per step.
  if (finite.is_cpu() && !finite.key_set().has(c10::DispatchKey::Python)) {
    PyTuple_SET_ITEM(pair, 1, PyBool_FromLong(finite.item<bool>()));
  } else {
    PyTuple_SET_ITEM(pair, 1, THPVariable_Wrap(std::move(finite)));
  }
  return pair;
  END_HANDLE_TH_ERRORS
}

// forward_eval(input, running_mean, running_var, weight, bias, residual, relu, eps) -> output:
// the op batchnorm::forward_eval through the dispatcher, for the same reason and with the same
// NotImplemented rule as forward_train above (an eval call of a small layer is mostly call cost).
PyObject* py_forward_eval(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8 || !THPVariable_CheckExact(args[0]) || !THPVariable_CheckExact(args[1]) ||
      !THPVariable_CheckExact(args[2]) || !PyBool_Check(args[6]) ||
      !PyFloat_CheckExact(args[7]) || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  OptTensor weight, bias, residual;
  if (!plain_tensor(args[3], weight) || !plain_tensor(args[4], bias) ||
      !plain_tensor(args[5], residual)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const Tensor& input = THPVariable_Unpack(args[0]);
  const Tensor& running_mean = THPVariable_Unpack(args[1]);
  const Tensor& running_var = THPVariable_Unpack(args[2]);
  const bool relu = args[6] == Py_True;
  const double eps = PyFloat_AS_DOUBLE(args[7]);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("batchnorm::forward_eval", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                        const OptTensor&, const OptTensor&, bool, double)>();
  Tensor output;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own bindings
    output = op.call(input, running_mean, running_var, weight, bias, residual, relu, eps);
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

PyObject* py_compiled_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(compiled_capability());
}

PyMethodDef methods[] = {
    {"register_kernels", py_register_kernels, METH_NOARGS,
     "Register the CPU kernels for the batchnorm ops (defined first, in batchnorm.ops). Returns "
     "False, registering nothing, when this processor lacks the instructions they were built "
     "for."},
    {"forward_train", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_forward_train)),
     METH_FASTCALL,
     "forward_train(input, weight, bias, residual, relu, eps, running_mean, running_var, "
     "num_batches_tracked, momentum) -> (output, finite): the op batchnorm::forward_train through "
     "the dispatcher, finite a bool where reading it is free (else the op's tensor); NotImplemented (call the op through torch.ops) for a tensor subclass, an "
     "argument of another type, or under a torch function mode."},
    {"forward_eval", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_forward_eval)),
     METH_FASTCALL,
     "forward_eval(input, running_mean, running_var, weight, bias, residual, relu, eps) -> "
     "output: the op batchnorm::forward_eval through the dispatcher; NotImplemented (call the op "
     "through torch.ops) for a tensor subclass, an argument of another type, or under a torch "
     "function mode."},
    {"compiled_capability", py_compiled_capability, METH_NOARGS,
     "The instruction set the kernels were compiled for: 'AVX512', 'AVX2' or 'DEFAULT'."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "batchnorm's CPU kernels (C++, at::vec, at::parallel_for)", -1,
                          methods};

}  // namespace
}  // namespace batchnorm::cpu

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&batchnorm::cpu::module_def); }
