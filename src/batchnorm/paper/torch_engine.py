"""The Figure 1 networks in torch, float32: S seeds of both networks in one set of tensors.

Each layer's weights of all seeds are one (S, fan_in, fan_out) tensor, so a layer of S networks
is one batched matmul (S, 60, fan_in) @ (S, fan_in, fan_out). The first layer goes further: the
plain and the BN network see the same batch, so their first weights sit side by side as
(S, 784, 2 * 100) and one matmul serves both ([..., :100] plain, [..., 100:] BN).

Batch norm is this package's batchnorm.BatchNorm1d (the production path), one layer of S * 100
channels per hidden layer: the S seeds' (60, 100) pre-activations laid side by side along the
channel axis as (60, S * 100), channel s * 100 + j being unit j of seed s. BN normalizes each
channel by its own batch statistics and has its own gamma, beta and running statistics per
channel, so this is exactly S separate BatchNorm1d(100) layers: the note's "per-dimension"
normalization at work. Its forward and backward are the two ops BatchNorm1d's training step
runs on (batchnorm::forward_train, which also updates the running statistics, and
::backward_train), called directly; everything else is written out by hand under no_grad: at
(60, 100) a training step is dominated by the per-call cost of each torch call, not by
arithmetic, so the step makes few, large calls into buffers allocated once (with the views it
reads them through), and each backward step mirrors its forward step.
"""

import contextlib
import time

import numpy as np
import torch

from batchnorm import kernels, ops
from batchnorm.nn import BatchNorm1d
from batchnorm.paper.data import MnistData
from batchnorm.paper.settings import NETS, Evaluation, InitialWeights, Settings

__all__ = ["TorchEngine", "bn_state", "bn_train_forward", "bn_train_backward",
           "denormals_flushed"]

# dL/dz = dL/da * a * (1 - a) into a given tensor (the out= form of torch's sigmoid backward)
_sigmoid_backward_into = torch.ops.aten.sigmoid_backward.grad_input


@contextlib.contextmanager
def denormals_flushed():
    """Denormal floats (below 1.2e-38 in float32) read and written as 0 on this thread while
    inside, the previous mode restored after (torch.set_flush_denormal sets the processor's
    FTZ/DAZ flags). Training needs it for speed, not for its numbers: once the BN network is
    confident, exp(logit - max) underflows, about 0.6% of dL/dlogits are denormal by step 10,000,
    and on Intel cores a matmul that reads denormals takes microcode assists (measured: steps
    after step 5,000 about 10% slower, 2.08-2.12 ms against 1.80-1.96 ms flushed). A value that
    small moves no weight: it is far below half an ulp of any weight it is added to."""
    flushing = bool(torch.tensor(1e-40) == 0)   # how a denormal literal comes out now
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushing)


def _stack(inits: list[InitialWeights], layer: int) -> torch.Tensor:
    """(S, fan_in, fan_out) float32: layer `layer` of every seed."""
    return torch.from_numpy(np.stack([init.weights[layer] for init in inits])).float()


def bn_state(norm: BatchNorm1d) -> tuple:
    """norm's weight, bias, eps, running_mean, running_var, num_batches_tracked and momentum,
    read once (a Module attribute lookup costs a few us; the tensors are updated in place)."""
    return (norm.weight, norm.bias, norm.eps, norm.running_mean, norm.running_var,
            norm.num_batches_tracked, norm.momentum)


def bn_train_forward(state: tuple, z: torch.Tensor):
    """What the layer of `state` (bn_state) does to z in training, running statistics updated in
    place, as one call of the op its forward ends in: batchnorm::forward_train. Returns (u,
    mean, invstd) for bn_train_backward. No autograd bookkeeping (at (60, 300) it costs more
    than the kernels); tests/test_paper.py checks both against the module and autograd."""
    weight, bias, eps, running_mean, running_var, tracked, momentum = state
    u, mean, _, invstd, _ = ops.forward_train(z, weight, bias, None, False, eps, running_mean,
                                              running_var, tracked, momentum)
    return u, mean, invstd


def bn_train_backward(state: tuple, du: torch.Tensor, z: torch.Tensor, mean, invstd):
    """(dL/dz, dL/dgamma, dL/dbeta): the backward of bn_train_forward, batchnorm::backward_train."""
    dz, sum_du, sum_du_xhat = ops.backward_train(du, z, mean, invstd, state[0], None)
    return dz, sum_du_xhat, sum_du


class TorchEngine:
    def __init__(self, data: MnistData, inits: list[InitialWeights], settings: Settings):
        self.settings = settings
        S = self.seeds = len(inits)
        layers = len(inits[0].weights)
        self.width = C = inits[0].weights[0].shape[1]
        if any(w.shape[1] != C for w in inits[0].weights[:-1]):
            raise ValueError("the torch engine lays hidden layers side by side: they must all "
                             f"have one width, got {[w.shape for w in inits[0].weights]}")
        self.x_train = torch.from_numpy(data.x_train)                       # (N, 784)
        self.onehot_train = torch.eye(10)[torch.from_numpy(data.y_train)]   # (N, 10)
        self.x_test = torch.from_numpy(data.x_test)
        self.y_test = torch.from_numpy(data.y_test)
        N = self.batch_size = settings.batch_size
        outputs = inits[0].weights[-1].shape[1]

        # Parameters; both networks start from the same weights. Layer 1 of both networks side
        # by side, [W_plain | W_bn], and its bias [b_plain | 0]: the BN network has no hidden
        # bias (beta takes its place), so its half stays 0 (its gradient is never written).
        # Weights are updated inside their gradient's matmul (w += -lr * a^T dz, one baddbmm_);
        # the biases are views of one vector, updated in one call; gamma and beta in another.
        first = _stack(inits, 0)
        self.w_first = torch.cat([first, first], dim=2)                    # (S, 784, 200)
        self.w = {net: [_stack(inits, i) for i in range(1, layers)] for net in NETS}
        self.w_t = {net: [w.transpose(1, 2) for w in self.w[net]] for net in NETS}   # views
        shapes = {"b_first": (S, 1, 2 * C),
                  **{f"b_plain{i}": (S, 1, C) for i in range(1, layers - 1)},
                  "b_out_plain": (S, 1, outputs), "b_out_bn": (S, 1, outputs)}
        self.small = torch.zeros(sum(int(np.prod(shape)) for shape in shapes.values()))
        self.small_grad = torch.zeros_like(self.small)
        self.p, self.g = {}, {}                   # parameter and gradient views, by name
        offset = 0
        for name, shape in shapes.items():
            size = int(np.prod(shape))
            self.p[name] = self.small[offset:offset + size].view(shape)
            self.g[name] = self.small_grad[offset:offset + size].view(shape)
            offset += size
        p = self.p
        self.norms = [BatchNorm1d(S * C, eps=settings.eps, momentum=settings.momentum)
                      for _ in range(layers - 1)]
        self.norm_parameters = [t.data for norm in self.norms for t in (norm.weight, norm.bias)]
        self.b_plain = [p["b_first"][..., :C]] + [p[f"b_plain{i}"] for i in range(1, layers - 1)]
        self.gb_plain = ([self.g["b_first"][..., :C]]
                         + [self.g[f"b_plain{i}"] for i in range(1, layers - 1)])
        self.b_out = {"plain": p["b_out_plain"], "bn": p["b_out_bn"]}
        self.gb_out = {"plain": self.g["b_out_plain"], "bn": self.g["b_out_bn"]}
        # Work buffers, each with the views the step reads it through, made once: at these
        # sizes a view or a fresh tensor costs as much as the arithmetic of an elementwise op.
        self.x = torch.empty(S * N, self.x_train.shape[1])            # (S * 60, 784)
        self.x_seeds = self.x.view(S, N, -1)                            # (S, 60, 784)
        self.x_t = self.x_seeds.transpose(1, 2)                         # (S, 784, 60)
        self.onehot = torch.empty(S * N, outputs)
        self.onehot_seeds = self.onehot.view(S, N, -1)
        self.z_first = torch.empty(S, N, 2 * C)
        self.dz_first = torch.empty(S, N, 2 * C)
        self.logits = torch.empty(2, S, N, outputs)                     # [plain, bn]
        self.logits_of = {net: self.logits[k] for k, net in enumerate(NETS)}  # (S, 60, 10)
        self.softmax = torch.empty_like(self.logits)                    # becomes dL/dlogits
        self.d_logits_of = {net: self.softmax[k] for k, net in enumerate(NETS)}
        self.row_max, self.row_sum = torch.empty(2, S, N, 1), torch.empty(2, S, N, 1)
        hidden = layers - 1
        # plain: activations per seed, (S, 60, 100)
        self.a_plain = [torch.empty(S, N, C) for _ in range(hidden)]
        self.a_plain_t = [a.transpose(1, 2) for a in self.a_plain]
        # BN: inputs and activations side by side, (60, S * 100), each also read per seed
        self.z_side = [torch.empty(N, S * C) for _ in range(hidden)]
        self.a_side = [torch.empty(N, S * C) for _ in range(hidden)]
        self.a_bn = [self._per_seed(a) for a in self.a_side]                 # (S, 60, 100)
        self.a_bn_t = [a.transpose(1, 2) for a in self.a_bn]
        self.z_bn = torch.empty(S, N, C)                  # h W of layers 2.., before the copy
        self.z_into_side = [z.view(N, S, C) for z in self.z_side]
        self.z_from = ([self.z_first[..., C:].transpose(0, 1)]
                       + [self.z_bn.transpose(0, 1)] * (hidden - 1))       # (60, S, 100) views
        # backward
        self.dh = {net: torch.empty(S, N, C) for net in NETS}
        self.dh_side = self.dh["bn"].transpose(0, 1)                        # (60, S, 100) view
        self.dz_plain = torch.empty(S, N, C)
        self.dz_first_halves = (self.dz_first[..., :C], self.dz_first[..., C:])
        self.du_side = torch.empty(N, S * C)                             # BN's output gradient
        self.du_into = self.du_side.view(N, S, C)
        self.a_side_nsc = [a.view(N, S, C) for a in self.a_side]
        self.z_plain_first = self.z_first[..., :C]
        self.norm_state = [bn_state(norm) for norm in self.norms]
        self.details = {"dtype": "float32", "torch": torch.__version__,
                        "bn_kernels": kernels.backend_name(self.x_train),
                        "torch_threads": torch.get_num_threads(),
                        "denormals": "flushed to zero while training (float_mode)"}

    def float_mode(self):
        """The floating-point environment training runs in: denormals flushed (see
        denormals_flushed)."""
        return denormals_flushed()

    # ------------------------------------------------------------------------------------------
    # layout: (S, N, 100) per seed <-> (N, S * 100) side by side

    def _side_by_side(self, z: torch.Tensor) -> torch.Tensor:
        """(S, N, 100) -> (N, S * 100), channel s * 100 + j = unit j of seed s (a copy)."""
        S, N, C = z.shape
        out = torch.empty(N, S * C)
        out.view(N, S, C).copy_(z.transpose(0, 1))
        return out

    def _per_seed(self, u: torch.Tensor) -> torch.Tensor:
        """(N, S * 100) -> (S, N, 100), a strided view (bmm reads it without a copy)."""
        return u.view(u.shape[0], self.seeds, self.width).transpose(0, 1)

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, batch: np.ndarray) -> None:
        """One SGD step of all 2 * S networks; batch (S, 60): seed s's train indices in row s."""
        N = self.batch_size
        index = torch.from_numpy(batch).view(-1)
        torch.index_select(self.x_train, 0, index, out=self.x)
        torch.index_select(self.onehot_train, 0, index, out=self.onehot)
        w, w_t, lr, hidden = self.w, self.w_t, self.settings.lr, len(self.norms)
        # layer 1 of both networks: [z_plain + b | z_bn] (S, 60, 200)
        torch.baddbmm(self.p["b_first"], self.x_seeds, self.w_first, out=self.z_first)

        # forward, plain: z = h W + b; a = sigmoid(z)
        a_plain = self.a_plain
        torch.sigmoid(self.z_plain_first, out=a_plain[0])
        for i in range(1, hidden):
            torch.baddbmm(self.b_plain[i], a_plain[i - 1], w["plain"][i - 1], out=a_plain[i])
            a_plain[i].sigmoid_()
        torch.baddbmm(self.b_out["plain"], a_plain[-1], w["plain"][-1],
                      out=self.logits_of["plain"])

        # forward, BN: z = h W; u = BN(z) on (60, S * 100); a = sigmoid(u)
        bn_tape = []
        for i in range(hidden):
            if i > 0:
                torch.bmm(self.a_bn[i - 1], w["bn"][i - 1], out=self.z_bn)   # (S, 60, 100)
            self.z_into_side[i].copy_(self.z_from[i])                      # -> (60, S * 100)
            u, mean, invstd = bn_train_forward(self.norm_state[i], self.z_side[i])  # S BNs as one
            torch.sigmoid(u, out=self.a_side[i])
            bn_tape.append((mean, invstd))
        torch.baddbmm(self.b_out["bn"], self.a_bn[-1], w["bn"][-1], out=self.logits_of["bn"])

        # softmax cross-entropy, mean over each seed's batch: dL/dlogits = (softmax - onehot) / N
        # (softmax written out: torch.softmax over a last axis of 10 costs 4x more here)
        e = self.softmax
        torch.amax(self.logits, 3, keepdim=True, out=self.row_max)
        torch.sub(self.logits, self.row_max, out=e).exp_()                # cannot overflow
        torch.sum(e, 3, keepdim=True, out=self.row_sum)
        e.div_(self.row_sum).sub_(self.onehot_seeds).div_(float(N))   # float: no int -> float cast

        # backward, in mirrored order
        norm_grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # layer: (d gamma, d beta)
        for k, net in enumerate(NETS):
            d, dh = self.d_logits_of[net], self.dh[net]
            acts, acts_t = (a_plain, self.a_plain_t) if k == 0 else (self.a_bn, self.a_bn_t)
            torch.sum(d, 1, keepdim=True, out=self.gb_out[net])
            torch.bmm(d, w_t[net][-1], out=dh)                             # (S, 60, 100)
            w[net][-1].baddbmm_(acts_t[-1], d, alpha=-lr)                  # SGD: W -= lr a^T d
            for i in reversed(range(hidden)):
                if k == 0:                                 # back through sigmoid (layer 1: into
                    dz = self.dz_first_halves[0] if i == 0 else self.dz_plain    # dz_first)
                    _sigmoid_backward_into(dh, acts[i], grad_input=dz)
                    torch.sum(dz, 1, keepdim=True, out=self.gb_plain[i])   # back through + b
                else:                                      # back through sigmoid, side by side
                    _sigmoid_backward_into(self.dh_side, self.a_side_nsc[i],
                                           grad_input=self.du_into)
                    mean, invstd = bn_tape[i]
                    dz_side, d_gamma, d_beta = bn_train_backward(          # back through BN
                        self.norm_state[i], self.du_side, self.z_side[i], mean, invstd)
                    norm_grads[i] = d_gamma, d_beta
                    dz = self._per_seed(dz_side)                           # (S, 60, 100) view
                    if i == 0:                             # layer 1: both networks at once
                        self.dz_first_halves[1].copy_(dz)
                if i > 0:                                                  # back through h W
                    torch.bmm(dz, w_t[net][i - 1], out=dh)   # with W before its update
                    w[net][i - 1].baddbmm_(acts_t[i - 1], dz, alpha=-lr)
        self.w_first.baddbmm_(self.x_t, self.dz_first, alpha=-lr)          # (S, 784, 200)

        # SGD for the biases in one call (the BN half of b_first's gradient is never written: it
        # stays 0, and so does that half of b_first), for gamma and beta in another
        self.small.add_(self.small_grad, alpha=-lr)
        torch._foreach_add_(self.norm_parameters,
                            [g for i in range(hidden) for g in norm_grads[i]], alpha=-lr)

    @torch.no_grad()
    def evaluate(self) -> list[Evaluation]:
        """Per seed: test accuracies and the tracked sigmoid's inputs, BN on running stats."""
        unit, C, p, w = self.settings.tracked_unit, self.width, self.p, self.w
        x = self.x_test.expand(self.seeds, *self.x_test.shape)       # (S, N_test, 784)
        z_first = torch.baddbmm(p["b_first"], x, self.w_first)      # (S, N_test, 200)
        # plain
        pre_plain = z_first[..., :C]
        for i, b in enumerate(self.b_plain[1:]):
            pre_plain = torch.baddbmm(b, torch.sigmoid(pre_plain), w["plain"][i])
        logits_plain = torch.baddbmm(self.b_out["plain"], torch.sigmoid(pre_plain),
                                     w["plain"][-1])
        # BN: normalizes with its running statistics (the module in eval mode)
        pre_bn = z_first[..., C:]
        for i, norm in enumerate(self.norms):
            z = pre_bn if i == 0 else torch.bmm(torch.sigmoid(pre_bn), w["bn"][i - 1])
            norm.eval()
            pre_bn = self._per_seed(norm(self._side_by_side(z)))     # (S, N_test, 100)
            norm.train()
        logits_bn = torch.baddbmm(self.b_out["bn"], torch.sigmoid(pre_bn), w["bn"][-1])
        accuracy_plain = (logits_plain.argmax(2) == self.y_test).double().mean(1)   # (S,)
        accuracy_bn = (logits_bn.argmax(2) == self.y_test).double().mean(1)
        return [Evaluation(accuracy_plain[s].item(), accuracy_bn[s].item(),
                           pre_plain[s, :, unit].double().numpy(),
                           pre_bn[s, :, unit].double().numpy())
                for s in range(self.seeds)]

    # ------------------------------------------------------------------------------------------

    def matmul_seconds_per_step(self, repeats: int = 500) -> float:
        """The floor of step(): the same batched matrix products it makes (forward, weight
        gradients with their SGD update, input gradients of layers 2-4, both networks), on the
        same shapes, strides and threads, and nothing else; the mean over `repeats` steps after
        2 untimed ones. Works on copies: the engine's weights are not changed."""
        S, N, C = self.seeds, self.batch_size, self.width
        w = {net: [t.clone() for t in self.w[net]] for net in NETS}
        w_t = {net: [t.transpose(1, 2) for t in w[net]] for net in NETS}
        w_first = self.w_first.clone()
        side = torch.rand(N, S * C)                        # a BN activation, side by side
        acts = {"plain": torch.rand(S, N, C), "bn": self._per_seed(side)}
        grads = {"plain": torch.rand(S, N, C), "bn": self._per_seed(side.clone())}
        d_out = torch.rand(S, N, self.logits.shape[3]) * 1e-3
        z_first, logits = torch.empty_like(self.z_first), torch.empty_like(self.logits)
        x = self.x_train[:S * N].reshape(S, N, -1)
        x_t, dz_first = x.transpose(1, 2), torch.rand_like(self.dz_first) * 1e-3

        def one_step():
            torch.baddbmm(self.p["b_first"], x, w_first, out=z_first)        # layer 1, both
            for k, net in enumerate(NETS):
                a, d = acts[net], grads[net]
                for weights in w[net][:-1]:
                    torch.bmm(a, weights)                                    # layers 2, 3
                torch.baddbmm(self.b_out[net], a, w[net][-1], out=logits[k])  # layer 4
                torch.bmm(d_out, w_t[net][-1])                                # back: layer 4
                w[net][-1].baddbmm_(a.transpose(1, 2), d_out, alpha=-1e-6)
                for i in reversed(range(len(w[net]) - 1)):                   # back: layers 3, 2
                    torch.bmm(d, w_t[net][i])
                    w[net][i].baddbmm_(a.transpose(1, 2), d, alpha=-1e-6)
            w_first.baddbmm_(x_t, dz_first, alpha=-1e-6)                      # back: layer 1

        with torch.no_grad():
            for _ in range(2):
                one_step()
            start = time.perf_counter()
            for _ in range(repeats):
                one_step()
            return (time.perf_counter() - start) / repeats
