// The autograd formula of batchnorm::forward_train in C++, registered for the AutogradCPU dispatch
// key by register_kernels() (ops.cpp), with the CPU kernels: the formula of the C++ backend, for
// the tensors it serves. Every other backend's training step has its formula in Python
// (ops._BatchNormTrain), which calls forward_train with grad mode off (straight to the kernel).
//
// Why in C++: a single-process training step of a small layer ((60, 100), 7x7 maps) is a few
// microseconds of kernel and tens of microseconds of Python autograd.Function machinery; this
// node costs what torch.nn's own batch-norm node costs. It is the same formula as ops.py's
// _BatchNormTrain (which serves SyncBatchNorm and the other backends): forward_train forward;
// backward_train backward (backward_reduce and the parameter gradients when the input needs
// none); under create_graph the statistics are recomputed through the differentiable
// primitives, so double backward sees their dependence on the input.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace batchnorm::cpu {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using ForwardTrain = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double,
    const OptTensor&, const OptTensor&, const OptTensor&, std::optional<double>);
using BackwardTrain = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&,
                                                         const OptTensor&, const OptTensor&);
using Stats = std::tuple<Tensor, Tensor>(const Tensor&);
using BackwardReduce = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const OptTensor&);
using BackwardElemt = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const OptTensor&, const Tensor&, const Tensor&, const OptTensor&);

OptTensor present(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// forward_train's kernel for the input's device, dispatched below the Autograd key.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_train_below_autograd(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& residual, bool relu, double eps, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    std::optional<double> momentum) {
  static const auto forward_train = op<ForwardTrain>("batchnorm::forward_train");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return forward_train.call(input, weight, bias, residual, relu, eps, running_mean, running_var,
                            num_batches_tracked, momentum);
}

struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& residual, bool relu, double eps,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& num_batches_tracked,
                               std::optional<double> momentum) {
    ctx->set_materialize_grads(false);  // no zero-filled grads for mean, m2, invstd, finite
    Tensor output, mean, m2, invstd, finite;
    std::tie(output, mean, m2, invstd, finite) =
        forward_train_below_autograd(input, weight, bias, residual, relu, eps, running_mean,
                                     running_var, num_batches_tracked, momentum);
    const bool has_weight = weight.has_value() && weight->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({input, has_weight ? *weight : Tensor(), mean, invstd,
                            relu ? output : Tensor()});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    ctx->saved_data["bias_dtype"] =
        has_bias ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    ctx->mark_non_differentiable({mean, m2, invstd, finite});
    return {output, mean, m2, invstd, finite};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(10);  // one per forward argument
    const Tensor& grad_out_given = grads[0];
    if (!grad_out_given.defined()) return result;  // only the statistics were used
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const OptTensor weight = present(saved[1]);
    Tensor mean = saved[2], invstd = saved[3];
    const OptTensor relu_output = present(saved[4]);
    const double count = static_cast<double>(input.numel() / input.size(1));
    const Tensor grad_out = grad_out_given;
    // needs_input_grad counts only the tensors given: absent optional arguments have no edge
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const size_t weight_edge = 1, bias_edge = weight.has_value() ? 2 : 1;
    const size_t residual_edge = bias_edge + (has_bias ? 1 : 0);
    Tensor grad_input, sum_dy, sum_dy_xhat;
    if (at::GradMode::is_enabled()) {
      // create_graph: mean and invstd depend on input; recompute them through the
      // differentiable ops so that second derivatives see that dependence.
      static const auto stats = op<Stats>("batchnorm::stats");
      static const auto backward_reduce = op<BackwardReduce>("batchnorm::backward_reduce");
      static const auto backward_elemt = op<BackwardElemt>("batchnorm::backward_elemt");
      Tensor m2;
      std::tie(mean, m2) = stats.call(input);
      invstd = m2.div(count).add(ctx->saved_data["eps"].toDouble()).rsqrt();
      std::tie(sum_dy, sum_dy_xhat) =
          backward_reduce.call(grad_out, input, mean, invstd, relu_output);
      if (ctx->needs_input_grad(0)) {
        grad_input = backward_elemt.call(grad_out, input, mean, invstd, weight,
                                         sum_dy.div(count), sum_dy_xhat.div(count), relu_output);
      }
    } else if (ctx->needs_input_grad(0)) {
      static const auto backward_train = op<BackwardTrain>("batchnorm::backward_train");
      std::tie(grad_input, sum_dy, sum_dy_xhat) =
          backward_train.call(grad_out, input, mean, invstd, weight, relu_output);
    } else {
      static const auto backward_reduce = op<BackwardReduce>("batchnorm::backward_reduce");
      std::tie(sum_dy, sum_dy_xhat) =
          backward_reduce.call(grad_out, input, mean, invstd, relu_output);
    }
    result[0] = grad_input;
    if (weight.has_value() && ctx->needs_input_grad(weight_edge)) {
      result[1] = sum_dy_xhat.to(weight->scalar_type());
    }
    if (has_bias && ctx->needs_input_grad(bias_edge)) {
      const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      result[2] = sum_dy.to(bias_dtype);
    }
    if (has_residual && ctx->needs_input_grad(residual_edge)) {
      // where(output > 0, dy, 0): 0 at a NaN output; TensorIterator lays the result out like
      // the output (channels-last stays channels-last, as torch's relu backward keeps it).
      result[3] = relu_output.has_value()
          ? at::where(relu_output->gt(0), grad_out, at::zeros({}, grad_out.options()))
          : grad_out;
    }
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_train_autograd(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& residual, bool relu, double eps, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    std::optional<double> momentum) {
  // Nothing to differentiate (no_grad, or no input that requires a gradient or carries a
  // forward-mode tangent): straight to the kernel, without the node's bookkeeping (allocating
  // it, saving tensors, wrapping outputs), which costs as much as a small layer's kernels.
  // Tangents live at level 0: torch does not nest forward-AD levels (torch.func's jvp is
  // handled above the op, by functional.py).
  const bool grad_mode = at::GradMode::is_enabled();
  const auto tracked = [grad_mode](const OptTensor& t) {
    return t.has_value() && t->defined() &&
           ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined());
  };
  if (!tracked(input) && !tracked(weight) && !tracked(bias) && !tracked(residual)) {
    return forward_train_below_autograd(input, weight, bias, residual, relu, eps, running_mean,
                                        running_var, num_batches_tracked, momentum);
  }
  auto out = BatchNormTrain::apply(input, weight, bias, residual, relu, eps, running_mean,
                                   running_var, num_batches_tracked, momentum);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

void register_autograd(torch::Library& library) {
  library.impl("forward_train", TORCH_FN(forward_train_autograd));
}

}  // namespace batchnorm::cpu
