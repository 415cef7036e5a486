"""The Figure 1 networks in NumPy, float64, forward and backward by hand (the specification path).

S seeds at once: each layer's weights of all seeds are one (S, fan_in, fan_out) array, and every
matmul runs over that leading seed axis. Batch norm is batchnorm.reference on the S seeds'
pre-activations laid side by side along the channel axis, (60, S * 100): BN is per channel
(its own mean, variance, gamma, beta and running statistics), so this is exactly S separate BN
layers of 100, the note's "per-dimension" normalization. train_forward / backward_closed_form
in training, update_running_stats for the population estimate, eval_forward at test time.
Everything else (linear layers, sigmoid, softmax cross-entropy, SGD) is written out here, each
backward step mirroring its forward step.
"""

import contextlib

import numpy as np

from batchnorm import reference
from batchnorm.paper.data import MnistData
from batchnorm.paper.settings import Evaluation, InitialWeights, Settings

__all__ = ["NumpyNet", "NumpyEngine", "sigmoid", "softmax_cross_entropy"]


def sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a large positive number overflows to inf, which gives the right limit 0 with a
    # warning; clip to where float64's sigmoid is already 0 or 1.
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0)))


def softmax_cross_entropy(logits: np.ndarray, onehot: np.ndarray):
    """(mean loss per seed (S,), dL/dlogits) for (S, N, K) logits and (S, N, K) one-hot labels:
    each seed's loss is the mean over its own batch."""
    n = logits.shape[-2]
    shifted = logits - logits.max(axis=-1, keepdims=True)      # exp cannot overflow
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (S, N, K)
    loss = -(log_p * onehot).sum(axis=(-1, -2)) / n
    dlogits = np.exp(log_p) - onehot                           # softmax - onehot
    return loss, dlogits / n                                   # the mean's 1/N


def _side_by_side(z: np.ndarray) -> np.ndarray:
    """(S, N, C) -> (N, S * C): channel s * C + j is unit j of seed s."""
    S, N, C = z.shape
    return z.transpose(1, 0, 2).reshape(N, S * C)


def _per_seed(u: np.ndarray, seeds: int) -> np.ndarray:
    """(N, S * C) -> (S, N, C), a view."""
    return u.reshape(u.shape[0], seeds, -1).transpose(1, 0, 2)


class NumpyNet:
    """S seeds of the 784-100-100-100-10 sigmoid network; with batch_norm=True, reference BN
    before each sigmoid and no hidden bias (beta replaces it)."""

    def __init__(self, inits: list[InitialWeights], batch_norm: bool, settings: Settings):
        self.batch_norm, self.settings = batch_norm, settings
        self.seeds = S = len(inits)
        layers = len(inits[0].weights)
        self.weights = [np.stack([init.weights[i] for init in inits]).astype(np.float64)
                        for i in range(layers)]                         # (S, in, out)
        widths = [w.shape[2] for w in self.weights]
        # hidden biases only without BN; the output layer always has one
        self.biases = [None if batch_norm and i < layers - 1 else np.zeros((S, 1, widths[i]))
                       for i in range(layers)]
        hidden = [S * c for c in widths[:-1]]          # BN channels: the seeds side by side
        self.gamma = [np.ones(c) for c in hidden] if batch_norm else []
        self.beta = [np.zeros(c) for c in hidden] if batch_norm else []
        self.running_mean = [np.zeros(c) for c in hidden] if batch_norm else []
        self.running_var = [np.ones(c) for c in hidden] if batch_norm else []
        self.num_batches_tracked = 0

    def bias(self, i: int) -> np.ndarray:
        """Layer i's bias (S, 1, out), for a layer that has one: the output layer, and every
        layer of the network without BN."""
        b = self.biases[i]
        assert b is not None, f"layer {i} of a BN network has no bias"
        return b

    def parameters(self) -> dict[str, np.ndarray]:
        """Every trainable array by name: weight{i} (S, in, out), bias{i} (S, 1, out), gamma{i}
        and beta{i} (S * 100,), seed s's channels at [s * 100:(s + 1) * 100]."""
        named = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            named[f"weight{i}"] = w
            if b is not None:
                named[f"bias{i}"] = b
        for i, (g, beta) in enumerate(zip(self.gamma, self.beta, strict=True)):
            named[f"gamma{i}"], named[f"beta{i}"] = g, beta
        return named

    def gradients(self, x: np.ndarray, onehot: np.ndarray, update_running: bool = True,
                  first_layer: np.ndarray | None = None):
        """(loss per seed (S,), {name: dL/dparameter}) for one training batch per seed, by
        hand: x (S, N, 784), onehot (S, N, 10). Also updates the running statistics, as a
        training step does (update_running=False leaves them). first_layer: x @ weights[0] if
        the caller has it already (the engine computes it for both networks in one matmul);
        grads["dz0"] is then the gradient at that product, for the caller's weight gradient,
        and grads["weight0"] is left out."""
        s = self.settings
        S = self.seeds
        hidden = len(self.weights) - 1
        grads = {}
        # forward: per hidden layer, z = h W (+ b);  u = BN(z) or z;  h' = sigmoid(u)
        h, tape = x, []
        for i in range(hidden):
            if i == 0 and first_layer is not None:
                z = first_layer
            else:
                z = h @ self.weights[i]                                       # (S, N, 100)
            if self.batch_norm:     # S BN layers of 100 channels as one of S * 100
                u, cache = reference.train_forward(_side_by_side(z), self.gamma[i],
                                                   self.beta[i], s.eps, axis=1)
                if update_running:
                    self.running_mean[i], self.running_var[i], _ = reference.update_running_stats(
                        self.running_mean[i], self.running_var[i], cache.mean, cache.var,
                        cache.m, s.momentum, self.num_batches_tracked)
                u = _per_seed(u, S)                                           # (S, N, 100)
            else:
                u, cache = z + self.bias(i), None
            a = sigmoid(u)
            tape.append((h, cache, a))
            h = a
        logits = h @ self.weights[-1] + self.bias(-1)                         # (S, N, 10)
        loss, dlogits = softmax_cross_entropy(logits, onehot)
        if self.batch_norm and update_running:
            self.num_batches_tracked += 1

        # backward, in mirrored order
        grads[f"weight{hidden}"] = h.transpose(0, 2, 1) @ dlogits               # (S, 100, 10)
        grads[f"bias{hidden}"] = dlogits.sum(axis=1, keepdims=True)
        dh = dlogits @ self.weights[-1].transpose(0, 2, 1)                      # (S, N, 100)
        for i in reversed(range(hidden)):
            h_in, cache, a = tape[i]
            du = dh * a * (1.0 - a)                      # back through the sigmoid
            if self.batch_norm:                           # back through BN
                dz, grads[f"gamma{i}"], grads[f"beta{i}"] = reference.backward_closed_form(
                    _side_by_side(du), cache)
                dz = _per_seed(dz, S)
            else:                                         # back through the bias
                dz = du
                grads[f"bias{i}"] = du.sum(axis=1, keepdims=True)
            if i == 0 and first_layer is not None:
                grads["dz0"] = dz
            else:
                grads[f"weight{i}"] = h_in.transpose(0, 2, 1) @ dz    # back through z = h W
            if i > 0:                                     # the input needs no gradient
                dh = dz @ self.weights[i].transpose(0, 2, 1)
        return loss, grads

    def sgd_step(self, x: np.ndarray, onehot: np.ndarray, lr: float) -> np.ndarray:
        loss, grads = self.gradients(x, onehot)
        for name, parameter in self.parameters().items():
            parameter -= lr * grads[name]                 # in place: the arrays are the state
        return loss

    def sigmoid_inputs(self, x: np.ndarray) -> np.ndarray:
        """(S, N, 100) inputs to the last hidden layer's sigmoids, eval mode (running stats);
        x (N, 784), the same for every seed."""
        h = x
        hidden = len(self.weights) - 1
        for i in range(hidden):
            z = h @ self.weights[i]                                            # (S, N, 100)
            if self.batch_norm:
                u = _per_seed(reference.eval_forward(
                    _side_by_side(z), self.running_mean[i], self.running_var[i], self.gamma[i],
                    self.beta[i], self.settings.eps, axis=1), self.seeds)
            else:
                u = z + self.bias(i)
            if i == hidden - 1:
                return u
            h = sigmoid(u)
        raise AssertionError("unreachable: the network has at least one hidden layer")

    def logits(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(self.sigmoid_inputs(x)) @ self.weights[-1] + self.bias(-1)


class NumpyEngine:
    def __init__(self, data: MnistData, inits: list[InitialWeights], settings: Settings):
        self.settings = settings
        self.seeds = len(inits)
        self.x_train = data.x_train.astype(np.float64)
        self.onehot_train = np.eye(10)[data.y_train]                         # (N, 10)
        self.x_test = data.x_test.astype(np.float64)
        self.y_test = data.y_test
        self.plain = NumpyNet(inits, batch_norm=False, settings=settings)
        self.bn = NumpyNet(inits, batch_norm=True, settings=settings)
        # both networks' first layer side by side, [W_plain | W_bn] (S, 784, 200), so that one
        # matmul serves both (they see the same batch); each network's weights[0] is a view
        self.width = width = self.plain.weights[0].shape[2]
        self.first = np.concatenate([self.plain.weights[0], self.bn.weights[0]], axis=2)
        self.plain.weights[0], self.bn.weights[0] = self.first[..., :width], self.first[..., width:]
        self.details = {"dtype": "float64", "numpy": np.__version__}

    def float_mode(self):
        """The floating-point environment training runs in: NumPy's as it is (in float64 the
        softmax underflows only for logits 708 apart, far beyond these networks')."""
        return contextlib.nullcontext()

    def step(self, batch: np.ndarray) -> None:
        """One SGD step of all 2 * S networks; batch (S, 60): seed s's train indices in row s."""
        x, onehot = self.x_train[batch], self.onehot_train[batch]      # (S, 60, 784), (S, 60, 10)
        width, lr = self.width, self.settings.lr
        z_first = x @ self.first                                       # (S, 60, 200)
        _, grads_plain = self.plain.gradients(x, onehot, first_layer=z_first[..., :width])
        _, grads_bn = self.bn.gradients(x, onehot, first_layer=z_first[..., width:])
        dz_first = np.concatenate([grads_plain.pop("dz0"), grads_bn.pop("dz0")], axis=2)
        self.first -= lr * (x.transpose(0, 2, 1) @ dz_first)           # (S, 784, 200)
        for net, grads in ((self.plain, grads_plain), (self.bn, grads_bn)):
            for name, parameter in net.parameters().items():
                if name != "weight0":                      # updated above, in self.first
                    parameter -= lr * grads[name]          # in place: the arrays are the state

    def evaluate(self) -> list[Evaluation]:
        unit = self.settings.tracked_unit
        per_net = []
        for net in (self.plain, self.bn):
            pre = net.sigmoid_inputs(self.x_test)                          # (S, N_test, 100)
            logits = sigmoid(pre) @ net.weights[-1] + net.bias(-1)
            per_net.append(((logits.argmax(axis=2) == self.y_test).mean(axis=1), pre))
        (acc_plain, pre_plain), (acc_bn, pre_bn) = per_net
        return [Evaluation(float(acc_plain[s]), float(acc_bn[s]), pre_plain[s, :, unit].copy(),
                           pre_bn[s, :, unit].copy()) for s in range(self.seeds)]
