"""`batchnorm bench --e2e`: training steps (forward, backward, SGD) of whole models, converted vs
torch.nn, and the share of the step that torch.nn's batch norm takes (the step with BN replaced
by an identity). `--compile`: both models under torch.compile (Inductor). CPU only."""

import copy
import functools
import statistics

import torch

from batchnorm.bench import report, timing


def small_cnn() -> torch.nn.Module:
    """Three conv + BN + ReLU stages on 3x32x32 input (CIFAR-sized), pooled, one linear layer."""
    nn = torch.nn
    layers, channels = [], [3, 32, 64, 128]
    for i, (c_in, c_out) in enumerate(zip(channels, channels[1:], strict=False)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class _BasicBlock(torch.nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(classes: int = 10) -> torch.nn.Module:
    """ResNet-18's layout (He et al. 2016): a 7x7 stem, four stages of two basic blocks."""
    nn = torch.nn
    blocks, c_in = [], 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        blocks += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, classes))


def basic_block() -> torch.nn.Module:
    """One ResNet basic block with a downsampling shortcut (64 -> 128 channels, 56x56 -> 28x28),
    pooled into a linear classifier."""
    nn = torch.nn
    return nn.Sequential(_BasicBlock(64, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10))


def resnet_64() -> torch.nn.Module:
    """A small ResNet for 64x64 input: a 3x3 stem, three stages of one basic block (32, 64, 128
    channels): many small BN layers, where per-call cost shows."""
    nn = torch.nn
    blocks, c_in = [], 32
    for c_out, stride in ((32, 1), (64, 2), (128, 2)):
        blocks.append(_BasicBlock(c_in, c_out, stride))
        c_in = c_out
    return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class _LinearBN(torch.nn.Sequential):
    """LeViT's Linear_BN: a linear layer on tokens (B, N, C), then BatchNorm1d over B * N."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(torch.nn.Linear(c_in, c_out, bias=False), torch.nn.BatchNorm1d(c_out))

    def forward(self, x):
        linear, bn = self[0], self[1]
        y = linear(x)
        return bn(y.flatten(0, 1)).view_as(y)


class _LeViTBlock(torch.nn.Module):
    """Attention and MLP on tokens, each projection a _LinearBN, with residuals (LeViT's)."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = _LinearBN(dim, 3 * dim), _LinearBN(dim, dim)
        self.mlp = torch.nn.Sequential(_LinearBN(dim, 2 * dim), torch.nn.Hardswish(),
                                       _LinearBN(2 * dim, dim))

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(x)


def levit_like() -> torch.nn.Module:
    """A LeViT-shaped hybrid for 64x64 input: a conv + BatchNorm2d stem down to 8x8 tokens of 64
    channels, then two attention blocks whose every projection is Linear + BatchNorm1d."""
    nn = torch.nn
    stem = []
    for c_in, c_out in ((3, 16), (16, 32), (32, 64)):
        stem += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                 nn.Hardswish()]
    return nn.Sequential(*stem, nn.Flatten(2), _Tokens(), _LeViTBlock(64), _LeViTBlock(64),
                         _MeanTokens(), nn.Linear(64, 10))


class _Tokens(torch.nn.Module):
    def forward(self, x):  # (B, C, N) -> (B, N, C)
        return x.transpose(1, 2)


class _MeanTokens(torch.nn.Module):
    def forward(self, x):  # (B, N, C) -> (B, C)
        return x.mean(1)


def mlp_bn() -> torch.nn.Module:
    """An MLP with BatchNorm1d after each hidden linear layer (tabular data, the paper's MNIST
    network): 256 -> 512 -> 512 -> 512 -> 10."""
    nn = torch.nn
    layers, widths = [], [256, 512, 512, 512]
    for w_in, w_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(w_in, w_out, bias=False), nn.BatchNorm1d(w_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


E2E_MODELS = {"small-cnn": (small_cnn, (32, 3, 32, 32)), "resnet18": (resnet18, (16, 3, 112, 112)),
              "resnet-64": (resnet_64, (8, 3, 64, 64)), "levit-like": (levit_like, (8, 3, 64, 64)),
              "mlp-bn": (mlp_bn, (64, 256))}
COMPILED_MODELS = {"small-cnn": (small_cnn, (32, 3, 32, 32)),
                   "basic-block": (basic_block, (16, 64, 56, 56))}


def _without_bn(model: torch.nn.Module) -> torch.nn.Module:
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(model, name, torch.nn.Identity())
        else:
            _without_bn(child)
    return model


def _train_step(model, x, target, optimizer):
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    return loss


def run(threads: list[int], layouts: list[str], rounds: int, repeat: int, compile: bool,
        out: str | None) -> int:
    machine = timing.machine("cpu")
    print(f"# batchnorm bench --e2e{' --compile' if compile else ''}: float32 training "
          f"steps (forward, backward, SGD), "
          f"torch {machine['torch']}, CPU kernels {machine['cpu_kernels']}, "
          f"THP_MEM_ALLOC_ENABLE={machine['THP_MEM_ALLOC_ENABLE']}, "
          f"load {machine['loadavg_start']}")
    print(f"{'model':>10} {'layout':>8} {'thr':>3} {'torch.nn ms':>12} {'ours ms':>10} "
          f"{'no-BN ms':>10} {'vs torch':>8} {'BN share':>8} {'spread':>6}")
    rows = []
    saved_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for name, (factory, shape) in (COMPILED_MODELS if compile else E2E_MODELS).items():
                for layout in layouts if len(shape) == 4 else ["contiguous"]:
                    row = _model_row(name, factory, shape, layout, compile, rounds, repeat)
                    rows.append(dict(row, threads=n_threads))
                    print(_line(rows[-1]), flush=True)
    finally:
        torch.set_num_threads(saved_threads)
    machine["loadavg_end"] = timing.load()
    if out:
        report.write(out, rows, machine)
        print(f"# wrote {out}")
    if not all(r["correct"] for r in rows):
        print("# WRONG: a converted model's step differs from torch.nn's")
        return 1
    return 0


def _model_row(name, factory, shape, layout, compile, rounds, repeat) -> dict:
    """torch.nn, converted and BN-less copies of one model: one checked step, then timed steps."""
    import batchnorm

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    reference = factory().to(memory_format=fmt)
    models = {"torch": reference, "ours": batchnorm.convert(copy.deepcopy(reference)),
              "no-bn": _without_bn(copy.deepcopy(reference))}
    if compile:
        timing.allow_recompiles()
        models = {k: torch.compile(m) for k, m in models.items()}
    x = torch.randn(shape).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (shape[0],))
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    # one step each from the same weights: ours must match torch.nn first
    losses = {k: float(_train_step(m, x, target, optimizers[k]).detach())
              for k, m in models.items() if k != "no-bn"}
    ok = abs(losses["ours"] - losses["torch"]) <= 1e-4 * max(1.0, abs(losses["torch"]))
    grads_ok = all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(
        models["ours"].parameters(), models["torch"].parameters(), strict=True))
    round_ms: dict[str, list[float]] = {k: [] for k in models}
    order = list(models.items())
    for number in range(rounds):  # the order reversed every other round, as timing's rounds
        for k, m in (order if number % 2 == 0 else order[::-1]):
            round_ms[k].append(statistics.median(timing.round_ms(
                functools.partial(_train_step, m, x, target, optimizers[k]), "cpu", repeat)))
    ms = {k: statistics.median(v) for k, v in round_ms.items()}
    spread = max((max(v) - min(v)) / statistics.median(v)
                 for k, v in round_ms.items() if k != "no-bn")
    return {"model": name, "input": "x".join(map(str, shape)), "layout": layout,
            "torch_ms": ms["torch"], "ours_ms": ms["ours"], "no_bn_ms": ms["no-bn"],
            "speedup_vs_torch": ms["torch"] / ms["ours"],
            "bn_share_torch": 1 - ms["no-bn"] / ms["torch"], "spread": spread,
            "noisy": spread > report.NOISY_SPREAD, "correct": ok and grads_ok}


def _line(r: dict) -> str:
    return (f"{r['model']:>10} {r['layout'][:8]:>8} {r['threads']:>3} {r['torch_ms']:>12.2f} "
            f"{r['ours_ms']:>10.2f} {r['no_bn_ms']:>10.2f} {r['speedup_vs_torch']:>8.2f} "
            f"{r['bn_share_torch']:>8.0%} {r['spread']:>6.0%}" + (" noisy" if r["noisy"] else "")
            + ("" if r["correct"] else " WRONG"))
