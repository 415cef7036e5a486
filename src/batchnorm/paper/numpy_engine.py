"""The Figure 1 networks in NumPy, float64, forward and backward by hand (the specification path).

Batch norm is batchnorm.reference: train_forward / backward_closed_form in training,
update_running_stats for the population estimate, eval_forward at test time. Everything else
(linear layers, sigmoid, softmax cross-entropy, SGD) is written out here, each backward step
mirroring its forward step.
"""

import numpy as np

from batchnorm import reference
from batchnorm.paper.data import MnistData
from batchnorm.paper.experiment import Evaluation, InitialWeights, Settings

__all__ = ["NumpyNet", "NumpyEngine", "sigmoid", "softmax_cross_entropy"]


def sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a large positive number overflows to inf, which gives the right limit 0 with a
    # warning; clip to where float64's sigmoid is already 0 or 1.
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0)))


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """(mean loss, dL/dlogits) for (N, K) logits and (N,) integer labels."""
    n = len(labels)
    shifted = logits - logits.max(axis=1, keepdims=True)       # exp cannot overflow
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))   # (N, K)
    loss = -log_p[np.arange(n), labels].mean()
    dlogits = np.exp(log_p)                                    # softmax
    dlogits[np.arange(n), labels] -= 1.0                       # p - onehot
    return loss, dlogits / n                                   # the mean's 1/N


class NumpyNet:
    """784-100-100-100-10 sigmoid network; with batch_norm=True, reference BN before each sigmoid
    and no hidden bias (beta replaces it)."""

    def __init__(self, init: InitialWeights, batch_norm: bool, settings: Settings):
        self.batch_norm, self.settings = batch_norm, settings
        self.weights = [w.astype(np.float64, copy=True) for w in init.weights]   # (in, out)
        layers = len(self.weights)
        widths = [w.shape[1] for w in self.weights]
        # hidden biases only without BN; the output layer always has one
        self.biases = [None if batch_norm and i < layers - 1 else np.zeros(widths[i])
                       for i in range(layers)]
        hidden = widths[:-1]
        self.gamma = [np.ones(c) for c in hidden] if batch_norm else []
        self.beta = [np.zeros(c) for c in hidden] if batch_norm else []
        self.running_mean = [np.zeros(c) for c in hidden] if batch_norm else []
        self.running_var = [np.ones(c) for c in hidden] if batch_norm else []
        self.num_batches_tracked = 0

    def parameters(self) -> dict[str, np.ndarray]:
        """Every trainable array by name (the names of SigmoidNet's state_dict where they match)."""
        named = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            named[f"weight{i}"] = w
            if b is not None:
                named[f"bias{i}"] = b
        for i, (g, beta) in enumerate(zip(self.gamma, self.beta, strict=True)):
            named[f"gamma{i}"], named[f"beta{i}"] = g, beta
        return named

    def gradients(self, x: np.ndarray, labels: np.ndarray, update_running: bool = True):
        """(loss, {name: dL/dparameter}) for one training batch, by hand; also updates the
        running statistics, as a training step does (update_running=False leaves them)."""
        s = self.settings
        hidden = len(self.weights) - 1
        grads = {}
        # forward: per hidden layer, z = h W (+ b);  u = BN(z) or z;  h' = sigmoid(u)
        h, tape = np.asarray(x, dtype=np.float64), []
        for i in range(hidden):
            z = h @ self.weights[i]                                           # (N, 100)
            if self.batch_norm:
                u, cache = reference.train_forward(z, self.gamma[i], self.beta[i], s.eps, axis=1)
                if update_running:
                    self.running_mean[i], self.running_var[i], _ = reference.update_running_stats(
                        self.running_mean[i], self.running_var[i], cache.mean, cache.var,
                        cache.m, s.momentum, self.num_batches_tracked)
            else:
                u, cache = z + self.biases[i], None
            a = sigmoid(u)
            tape.append((h, cache, a))
            h = a
        logits = h @ self.weights[-1] + self.biases[-1]                      # (N, 10)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        if self.batch_norm and update_running:
            self.num_batches_tracked += 1

        # backward, in mirrored order
        grads[f"weight{hidden}"] = h.T @ dlogits                              # (100, 10)
        grads[f"bias{hidden}"] = dlogits.sum(axis=0)
        dh = dlogits @ self.weights[-1].T                                     # (N, 100)
        for i in reversed(range(hidden)):
            h_in, cache, a = tape[i]
            du = dh * a * (1.0 - a)                      # back through the sigmoid
            if self.batch_norm:                           # back through BN
                dz, grads[f"gamma{i}"], grads[f"beta{i}"] = reference.backward_closed_form(
                    du, cache)
            else:                                         # back through the bias
                dz = du
                grads[f"bias{i}"] = du.sum(axis=0)
            grads[f"weight{i}"] = h_in.T @ dz             # back through z = h W
            if i > 0:                                     # the input needs no gradient
                dh = dz @ self.weights[i].T
        return loss, grads

    def sgd_step(self, x: np.ndarray, labels: np.ndarray, lr: float) -> float:
        loss, grads = self.gradients(x, labels)
        for name, parameter in self.parameters().items():
            parameter -= lr * grads[name]                 # in place: the arrays are the state
        return loss

    def sigmoid_inputs(self, x: np.ndarray) -> np.ndarray:
        """(N, 100) inputs to the last hidden layer's sigmoids, eval mode (running stats)."""
        h = np.asarray(x, dtype=np.float64)
        hidden = len(self.weights) - 1
        for i in range(hidden):
            z = h @ self.weights[i]
            if self.batch_norm:
                u = reference.eval_forward(z, self.running_mean[i], self.running_var[i],
                                           self.gamma[i], self.beta[i], self.settings.eps, axis=1)
            else:
                u = z + self.biases[i]
            if i == hidden - 1:
                return u
            h = sigmoid(u)
        raise AssertionError("unreachable: the network has at least one hidden layer")

    def logits(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(self.sigmoid_inputs(x)) @ self.weights[-1] + self.biases[-1]


class NumpyEngine:
    def __init__(self, data: MnistData, init: InitialWeights, settings: Settings):
        self.settings = settings
        self.x_train = data.x_train.astype(np.float64)
        self.y_train = data.y_train
        self.x_test = data.x_test.astype(np.float64)
        self.y_test = data.y_test
        self.plain = NumpyNet(init, batch_norm=False, settings=settings)
        self.bn = NumpyNet(init, batch_norm=True, settings=settings)
        self.details = {"dtype": "float64", "numpy": np.__version__}

    def step(self, batch: np.ndarray) -> None:
        x, y = self.x_train[batch], self.y_train[batch]
        self.plain.sgd_step(x, y, self.settings.lr)
        self.bn.sgd_step(x, y, self.settings.lr)

    def evaluate(self) -> Evaluation:
        unit = self.settings.tracked_unit
        accuracies, inputs = [], []
        for net in (self.plain, self.bn):
            pre = net.sigmoid_inputs(self.x_test)                         # (N_test, 100)
            logits = sigmoid(pre) @ net.weights[-1] + net.biases[-1]
            accuracies.append(float((logits.argmax(axis=1) == self.y_test).mean()))
            inputs.append(pre[:, unit].copy())
        return Evaluation(accuracies[0], accuracies[1], inputs[0], inputs[1])
