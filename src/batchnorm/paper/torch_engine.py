"""The Figure 1 networks in torch, with this package's batchnorm.BatchNorm1d (the production path).

Both networks train in float32, with plain SGD, on the same batches. One backward call serves
both: their losses are summed (they share no parameter, so each gets exactly its own gradient),
which halves the autograd engine's per-step overhead on these small (60, 100) tensors.
"""

import numpy as np
import torch
from torch import nn

from batchnorm import kernels
from batchnorm.nn import BatchNorm1d
from batchnorm.paper.data import MnistData
from batchnorm.paper.experiment import Evaluation, InitialWeights, Settings

__all__ = ["SigmoidNet", "TorchEngine"]


class SigmoidNet(nn.Module):
    """784-100-100-100-10: Linear (+ BatchNorm1d) + sigmoid per hidden layer, then Linear.

    With batch_norm=True the hidden Linear layers have no bias: BN subtracts the batch mean, which
    would cancel it, and beta takes its place.
    """

    def __init__(self, init: InitialWeights, batch_norm: bool, settings: Settings):
        super().__init__()
        self.hidden = nn.ModuleList()
        for w in init.weights[:-1]:
            fan_in, fan_out = w.shape
            linear = nn.Linear(fan_in, fan_out, bias=not batch_norm)
            norm = (BatchNorm1d(fan_out, eps=settings.eps, momentum=settings.momentum)
                    if batch_norm else nn.Identity())
            self.hidden.append(nn.Sequential(linear, norm))
        self.output = nn.Linear(*init.weights[-1].shape)
        with torch.no_grad():
            linears = [block[0] for block in self.hidden] + [self.output]
            for linear, w in zip(linears, init.weights, strict=True):
                linear.weight.copy_(torch.from_numpy(w.T))  # torch stores (fan_out, fan_in)
                if linear.bias is not None:
                    linear.bias.zero_()

    def sigmoid_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 100): the inputs to the last hidden layer's sigmoids (after BN, if any)."""
        for block in self.hidden[:-1]:
            x = torch.sigmoid(block(x))
        return self.hidden[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.sigmoid(self.sigmoid_inputs(x)))   # (N, 10) logits


class TorchEngine:
    def __init__(self, data: MnistData, init: InitialWeights, settings: Settings):
        self.settings = settings
        self.x_train = torch.from_numpy(data.x_train)
        self.y_train = torch.from_numpy(data.y_train)
        self.x_test = torch.from_numpy(data.x_test)
        self.y_test = torch.from_numpy(data.y_test)
        self.plain = SigmoidNet(init, batch_norm=False, settings=settings)
        self.bn = SigmoidNet(init, batch_norm=True, settings=settings)
        parameters = list(self.plain.parameters()) + list(self.bn.parameters())
        self.optimizer = torch.optim.SGD(parameters, lr=settings.lr)
        self.details = {"dtype": "float32", "torch": torch.__version__,
                        "bn_kernels": kernels.backend_name(self.x_train),
                        "torch_threads": torch.get_num_threads()}

    def step(self, batch: np.ndarray) -> None:
        index = torch.from_numpy(batch)
        x, y = self.x_train[index], self.y_train[index]            # (60, 784), (60,)
        self.plain.train()
        self.bn.train()
        loss = (nn.functional.cross_entropy(self.plain(x), y)
                + nn.functional.cross_entropy(self.bn(x), y))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self) -> Evaluation:
        unit = self.settings.tracked_unit
        accuracies, inputs = [], []
        for net in (self.plain, self.bn):
            net.eval()   # BN normalizes with its running statistics
            pre = net.sigmoid_inputs(self.x_test)                    # (N_test, 100)
            logits = net.output(torch.sigmoid(pre))
            accuracies.append((logits.argmax(1) == self.y_test).double().mean().item())
            inputs.append(pre[:, unit].double().numpy())
        return Evaluation(accuracies[0], accuracies[1], inputs[0], inputs[1])
