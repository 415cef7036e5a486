// The autograd formula of batchnorm::forward_train in C++, registered for the AutogradCPU dispatch
// key by register_kernels() (ops.cpp), with the CPU kernels: the formula of the C++ backend, for
// the tensors it serves. Every other backend's training step has its formula in Python
// (ops._BatchNormTrain), which calls forward_train with grad mode off (straight to the kernel).
//
// Why in C++: a single-process training step of a small layer ((60, 100), 7x7 maps) is a few
// microseconds of kernel and tens of microseconds of Python autograd.Function machinery. It is
// the same formula as ops.py's _BatchNormTrain (which serves SyncBatchNorm and the other
// backends): forward_train forward; backward_train backward (backward_reduce and the parameter
// gradients when the input needs none); under create_graph the statistics are recomputed through
// the differentiable primitives, so double backward sees their dependence on the input.
//
// Why a Node of our own rather than torch::autograd::Function: the graph node is built the way
// torch's generated nodes (NativeBatchNormBackward0) are built, with the edges collected from
// the four differentiable arguments, the tensors kept as SavedVariables, and history set on the
// one differentiable output. torch::autograd::Function does more per call (a list of every
// argument, input and output descriptions, a saved_data map keyed by strings, a wrapped output
// per return value); measured at (4, 8), one thread, it cost ~3.5 us of the forward and ~3 us of
// the backward more than torch's node, about a fifth of a small layer's training step.
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <tuple>

namespace batchnorm::cpu {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
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

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
OptTensor present(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
// t in dtype; as itself when it is already (Tensor::to would return it too, after a dispatch).
Tensor in_dtype(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

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

// The graph node of one training step. Its edges (and so the gradients apply returns) are, in
// order: input, weight, bias, residual (an edge of an absent argument is invalid). Its one input
// is the gradient of the output: mean, m2, invstd and finite are not differentiable.
struct BatchNormTrainBackward : public torch::autograd::Node {
  SavedVariable input_, weight_, mean_, invstd_;
  SavedVariable relu_output_;  // the output, saved for the ReLU mask: only with relu
  double eps_ = 0;
  at::ScalarType weight_dtype_ = at::kFloat, bias_dtype_ = at::kFloat;

  std::string name() const override { return "BatchNormTrainBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    mean_.reset_data();
    invstd_.reset_data();
    relu_output_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result(4);  // one per edge
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;
    const Tensor input = input_.unpack();
    const OptTensor weight = present(weight_.unpack());
    Tensor mean = mean_.unpack(), invstd = invstd_.unpack();
    const OptTensor relu_output = present(relu_output_.unpack(getptr()));
    const bool input_grad = task_should_compute_output(0);
    const bool weight_grad = task_should_compute_output(1);
    const bool bias_grad = task_should_compute_output(2);
    const bool residual_grad = task_should_compute_output(3);
    Tensor grad_input, sum_dy, sum_dy_xhat;
    if (at::GradMode::is_enabled()) {
      // create_graph: mean and invstd depend on input; recompute them through the
      // differentiable ops so that second derivatives see that dependence.
      static const auto stats = op<Stats>("batchnorm::stats");
      static const auto backward_reduce = op<BackwardReduce>("batchnorm::backward_reduce");
      static const auto backward_elemt = op<BackwardElemt>("batchnorm::backward_elemt");
      const double count = static_cast<double>(input.numel() / input.size(1));
      Tensor m2;
      std::tie(mean, m2) = stats.call(input);
      invstd = m2.div(count).add(eps_).rsqrt();
      std::tie(sum_dy, sum_dy_xhat) =
          backward_reduce.call(grad_out, input, mean, invstd, relu_output);
      if (input_grad) {
        grad_input = backward_elemt.call(grad_out, input, mean, invstd, weight,
                                         sum_dy.div(count), sum_dy_xhat.div(count), relu_output);
      }
    } else {
      // Nothing is recorded here: straight to the kernels, past the Autograd and
      // ADInplaceOrView keys (the ops have no formula there, only fallbacks that cost time).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (input_grad) {
        static const auto backward_train = op<BackwardTrain>("batchnorm::backward_train");
        std::tie(grad_input, sum_dy, sum_dy_xhat) =
            backward_train.call(grad_out, input, mean, invstd, weight, relu_output);
      } else if (weight_grad || bias_grad) {
        static const auto backward_reduce = op<BackwardReduce>("batchnorm::backward_reduce");
        std::tie(sum_dy, sum_dy_xhat) =
            backward_reduce.call(grad_out, input, mean, invstd, relu_output);
      }
    }
    result[0] = grad_input;
    if (weight_grad) result[1] = in_dtype(sum_dy_xhat, weight_dtype_);
    if (bias_grad) result[2] = in_dtype(sum_dy, bias_dtype_);
    if (residual_grad) {
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
  // Forward-mode tangents are refused, not dropped: this formula has no jvp (torch.func and
  // forward-mode AD reach torch's batch norm through functional.py's router). Tangents live at
  // level 0: torch does not nest forward-AD levels.
  const auto tangent = [](const OptTensor& t) {
    return given(t) && t->_fw_grad(/*level=*/0).defined();
  };
  TORCH_CHECK(!input._fw_grad(/*level=*/0).defined() && !tangent(weight) && !tangent(bias) &&
                  !tangent(residual),
              "batchnorm::forward_train: forward-mode AD (jvp) is not implemented for the C++ "
              "training node; batchnorm.functional.batch_norm sends dual tensors to torch's "
              "batch norm");
  // Nothing to differentiate (no_grad, or no input that requires a gradient): straight to the
  // kernel, without a node.
  if (!torch::autograd::compute_requires_grad(input, weight, bias, residual)) {
    return forward_train_below_autograd(input, weight, bias, residual, relu, eps, running_mean,
                                        running_var, num_batches_tracked, momentum);
  }
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    functorch->checkSupportsCppAutogradFunction();  // torch.func handles this op above it
  }
  auto node = c10::make_intrusive<BatchNormTrainBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, residual));
  auto outputs = forward_train_below_autograd(input, weight, bias, residual, relu, eps,
                                              running_mean, running_var, num_batches_tracked,
                                              momentum);
  const Tensor& output = std::get<0>(outputs);
  torch::autograd::set_history(output, node);
  node->input_ = SavedVariable(input, /*is_output=*/false);
  if (given(weight)) {
    node->weight_ = SavedVariable(*weight, /*is_output=*/false);
    node->weight_dtype_ = weight->scalar_type();
  }
  if (given(bias)) node->bias_dtype_ = bias->scalar_type();
  node->mean_ = SavedVariable(std::get<1>(outputs), /*is_output=*/false);  // no history: leaves
  node->invstd_ = SavedVariable(std::get<3>(outputs), /*is_output=*/false);
  if (relu) node->relu_output_ = SavedVariable(output, /*is_output=*/true);
  node->eps_ = eps;
  return outputs;
}

}  // namespace

void register_autograd(torch::Library& library) {
  library.impl("forward_train", TORCH_FN(forward_train_autograd));
}

}  // namespace batchnorm::cpu
