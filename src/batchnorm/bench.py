"""`batchnorm bench`: ours against torch.nn eager and torch.compile'd torch.nn, on CPU.

Every (shape, layout, mode, thread count) is measured in this one process, the providers
interleaved round by round, and the median of all repetitions kept. Before timing, each provider's
outputs and gradients are compared with torch.nn eager's: a wrong kernel reports WRONG, never a
speedup (and the command exits 1).

Roofline: the one-sweep limit, the bytes a mode must move at the least (forward: read x, write
y; backward: read x and dy, write dx; a fused ReLU's backward also reads y; see
BYTES_PER_ELEMENT) over the copy bandwidth measured in the same run (`dst.copy_(src)` of the same
size). "x roofline" is time / that bound.

Spread: each provider's median per round; "spread" is (slowest - fastest round) / median for
ours and torch, and a row whose spread exceeds NOISY_SPREAD is marked "noisy": its ratios are not
to be relied on (a loaded machine).

`--e2e`: training steps (forward, backward, SGD) of whole models, converted vs torch.nn, and the
share of the step that torch.nn's batch norm takes (the step with BN replaced by an identity).
"""

import argparse
import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

RESNET50 = [(16, 64, 112, 112), (16, 64, 56, 56), (16, 256, 56, 56), (16, 128, 28, 28),
            (16, 512, 28, 28), (16, 256, 14, 14), (16, 1024, 14, 14), (16, 512, 7, 7),
            (16, 2048, 7, 7)]
SHAPES = RESNET50 + [(60, 100), (256, 1024), (16, 256, 2000)]
QUICK_SHAPES = [(16, 64, 56, 56), (16, 256, 14, 14), (256, 1024)]
MODES = ["train-fwd", "train-fwd-bwd", "eval-fwd", "relu-fwd-bwd"]
# The one-sweep limit in units of the input size: each full-size tensor read or written once.
# forward: x, y. backward: x, dy, dx; the fused ReLU's backward reads y for its mask.
BYTES_PER_ELEMENT = {"train-fwd": 2, "train-fwd-bwd": 5, "eval-fwd": 2, "relu-fwd-bwd": 6}
NOISY_SPREAD = 0.15
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="3 shapes, eager providers only, fewer repetitions (about 30 s)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shapes like 16x64x56x56 (default: the ResNet-50 "
                             "BN shapes at batch 16, 60x100, 256x1024, 16x256x2000)")
    parser.add_argument("--layouts", default="contiguous,channels_last",
                        help="contiguous and/or channels_last (4D/5D shapes only)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    parser.add_argument("--providers", default=None,
                        help="ours,torch,compile (default: all; --quick: ours,torch)")
    parser.add_argument("--threads", default="1,2", help="thread counts to run, e.g. 1,2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16",
                                                                "float16"])
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed calls per provider and round (default 5, --quick 3)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 5, --quick 3)")
    parser.add_argument("--out", default=None, help="write results to this .json or .csv file")
    parser.add_argument("--compile", action="store_true",
                        help="with --e2e: torch.compile both models (Inductor) and time the "
                             "compiled training steps, a small CNN and a ResNet basic block")
    parser.add_argument("--e2e", action="store_true",
                        help="whole-model training steps instead of single layers: a small CNN "
                             "(3x32x32, batch 32) and a ResNet-18-shaped model (112x112, "
                             "batch 16), converted vs torch.nn, with BN's share of the step")


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(n) for n in item.strip().lower().split("x"))
        except ValueError:
            raise SystemExit(f"batchnorm bench: --shapes expects sizes like 16x64x56x56, got "
                             f"{item!r}") from None
        if len(shape) < 2:
            raise SystemExit(f"batchnorm bench: a shape needs at least (N, C), got {item!r}")
        shapes.append(shape)
    return shapes


def _times_ms(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _batch_norm_fns(provider: str):
    """(train_or_eval batch norm, relu-fused batch norm) for a provider."""
    import batchnorm.functional as ours_f

    torch_bn = torch.nn.functional.batch_norm
    if provider in ("ours", "ours-unfused"):
        return ours_f.batch_norm
    if provider in ("torch", "torch+relu"):
        return torch_bn
    if provider in ("compile", "compile+relu"):
        return torch.compile(torch_bn, dynamic=False)  # one graph per case: see _allow_recompiles
    raise ValueError(provider)


def _make_case(provider: str, mode: str, x, w, b, dy, running):
    """A closure running one mode for one provider, and one returning its results to compare."""
    bn = _batch_norm_fns(provider)
    training = mode != "eval-fwd"
    relu = mode == "relu-fwd-bwd"
    backward = mode in ("train-fwd-bwd", "relu-fwd-bwd")
    rm, rv = running

    def forward():
        if relu and provider == "ours":
            return bn(x, rm, rv, w, b, training, 0.1, 1e-5, relu=True)  # fused
        y = bn(x, rm, rv, w, b, training, 0.1, 1e-5)
        return torch.relu(y) if relu else y

    def results():
        if not backward:
            with torch.no_grad():
                return (forward(),)
        y = forward()
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    return results


def _run_case(shape, layout, mode, providers, dtype, repeat, rounds, copy_ms):
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    C = shape[1]
    x.requires_grad_(mode in ("train-fwd-bwd", "relu-fwd-bwd"))
    w = torch.rand(C, dtype=dtype).add_(0.5).requires_grad_()
    b = torch.randn(C, dtype=dtype).requires_grad_()
    dy = torch.randn_like(x)
    names = list(providers)
    if mode == "relu-fwd-bwd" and "ours" in names:
        names.insert(names.index("ours") + 1, "ours-unfused")
    cases = {}
    for name in names:
        running = (torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype))
        cases[name] = _make_case(name, mode, x, w, b, dy, running)

    # correctness against torch.nn eager before any timing
    reference = _make_case("torch", mode, x, w, b, dy, (torch.zeros(C, dtype=dtype),
                                                          torch.ones(C, dtype=dtype)))()
    correct = {}
    for name, fn in cases.items():
        got = fn()
        # ReLU ties: an output within rounding of 0, clamped by one provider and not by the
        # other, moves one element of dx and one channel's d weight by O(1); measured up to
        # 3e-3 relative at 3M elements. A wrong kernel is off by O(1) relative.
        tols = [TOLERANCE[dtype]] + [TOLERANCE[dtype] * (10 if mode == "relu-fwd-bwd" else 1)] * 3
        correct[name] = all(_close(g, r, tol)
                            for g, r, tol in zip(got, reference, tols[:len(got)], strict=True))
    times = {name: [] for name in names}
    round_medians = {name: [] for name in names}
    for _ in range(rounds):
        for name, fn in cases.items():
            this_round = _times_ms(fn, repeat)
            times[name] += this_round
            round_medians[name].append(statistics.median(this_round))
    row_ms = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: (max(r) - min(r)) / statistics.median(r) for name, r in round_medians.items()}
    size = x.numel() * x.element_size()
    bound_ms = copy_ms * BYTES_PER_ELEMENT[mode] / 2  # a copy moves 2 x size
    return row_ms, correct, bound_ms, size, spread


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Relative error in the 2-norm below tol.

    A norm, not elementwise: with a ReLU, an output within rounding of 0 may be clamped by one
    provider and not the other, which moves that element's gradient by O(1); a wrong kernel moves
    the whole tensor.
    """
    got, ref = got.double(), ref.double()
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return False
    return bool((got - ref).norm() <= tol * max(ref.norm().item(), 1e-12))


def _copy_ms(numel: int, dtype, repeat: int) -> float:
    src = torch.randn(numel, dtype=dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return statistics.median(_times_ms(lambda: dst.copy_(src), max(repeat * 3, 9)))


def _machine() -> dict:
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return "unknown"

    from batchnorm.kernels import cpu

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_kernels": cpu.compiled_capability() or "not built",
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "transparent_hugepage": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "loadavg_start": read("/proc/loadavg"),
    }


def _allow_recompiles() -> None:
    """Every shape x layout x mode compiles torch's batch_norm anew; past dynamo's default limit
    (8 recompiles) torch.compile silently runs eager, and the 'compile' column would be torch's."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 100_000
    torch._dynamo.config.accumulated_recompile_limit = 100_000


def run(args: argparse.Namespace) -> int:
    from batchnorm import kernels

    if args.e2e:
        return run_e2e(args)

    shapes = _parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick
                                                             else SHAPES)
    providers = (args.providers or ("ours,torch" if args.quick else "ours,torch,compile"))
    providers = [p.strip() for p in providers.split(",")]
    for p in providers:
        if p not in ("ours", "torch", "compile"):
            raise SystemExit(f"batchnorm bench: providers are ours, torch, compile; got {p!r}")
    if "compile" in providers:
        _allow_recompiles()
    modes = [m.strip() for m in args.modes.split(",")]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"batchnorm bench: modes are {', '.join(MODES)}; got {m!r}")
    layouts = [lay.strip() for lay in args.layouts.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    dtype = getattr(torch, args.dtype)
    repeat = args.repeat or (3 if args.quick else 5)
    rounds = args.rounds or (3 if args.quick else 5)
    backend = kernels.backend_name(torch.empty(1, dtype=dtype))

    machine = _machine()
    print(f"# batchnorm bench: {args.dtype}, ours on the '{backend}' kernels, "
          f"torch {machine['torch']}, CPU kernels {machine['cpu_kernels']}, THP_MEM_ALLOC_ENABLE="
          f"{machine['THP_MEM_ALLOC_ENABLE']}, THP {machine['transparent_hugepage']}, "
          f"load {machine['loadavg_start']}")
    header = (f"{'shape':>20} {'layout':>8} {'mode':>14} {'thr':>3} "
              + " ".join(f"{n + ' ms':>12}" for n in _all_names(providers))
              + f" {'vs torch':>8} {'vs compile':>10} {'vs unfused':>10} {'x roofline':>10}"
              + f" {'spread':>6}")
    print(header)
    rows, wrong = [], False
    saved_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for shape in shapes:
                copy_ms = _copy_ms(int(torch.tensor(shape).prod()), dtype, repeat)
                for layout in layouts:
                    if layout == "channels_last" and len(shape) not in (4, 5):
                        continue
                    for mode in modes:
                        ms, correct, bound_ms, size, spread = _run_case(
                            shape, layout, mode, providers, dtype, repeat, rounds, copy_ms)
                        row = _row(shape, layout, mode, n_threads, ms, correct, bound_ms, size,
                                   copy_ms, spread)
                        wrong |= not all(correct.values())
                        rows.append(row)
                        print(_format(row, providers), flush=True)
    finally:
        torch.set_num_threads(saved_threads)
    machine["loadavg_end"] = _machine()["loadavg_start"]
    print(f"# load at the end: {machine['loadavg_end']}")
    if args.out:
        _write(args.out, rows, machine)
        print(f"# wrote {args.out}")
    if wrong:
        print("# WRONG: some provider's outputs or gradients differ from torch.nn's")
    return 1 if wrong else 0


def _all_names(providers):
    names = list(providers)
    if "ours" in names:
        names.insert(names.index("ours") + 1, "ours-unfused")
    return names


def _row(shape, layout, mode, n_threads, ms, correct, bound_ms, size, copy_ms, spread) -> dict:
    row = {"shape": "x".join(map(str, shape)), "layout": layout, "mode": mode,
           "threads": n_threads, "bytes": size, "copy_ms": copy_ms, "roofline_ms": bound_ms}
    row["spread"] = max(spread.get("ours", 0.0), spread.get("torch", 0.0))
    row["noisy"] = row["spread"] > NOISY_SPREAD
    for name, value in ms.items():
        row[f"{name}_ms"] = value
        row[f"{name}_correct"] = correct[name]
    ours = ms.get("ours")
    for other, key in (("torch", "speedup_vs_torch"), ("compile", "speedup_vs_compile"),
                       ("ours-unfused", "speedup_vs_unfused")):
        if ours is not None and other in ms:
            row[key] = ms[other] / ours
    if ours is not None:
        row["x_roofline"] = ours / bound_ms
    return row


def _format(row: dict, providers) -> str:
    cells = []
    for name in _all_names(providers):
        value = row.get(f"{name}_ms")
        if value is None:
            cells.append(f"{'-':>12}")
        else:
            mark = "" if row[f"{name}_correct"] else " WRONG"
            cells.append(f"{value:>12.3f}" if not mark else f"{mark:>12}")

    def ratio(key, width):
        return f"{row[key]:>{width}.2f}" if key in row else f"{'-':>{width}}"

    return (f"{row['shape']:>20} {row['layout'][:8]:>8} {row['mode']:>14} {row['threads']:>3} "
            + " ".join(cells) + f" {ratio('speedup_vs_torch', 8)} "
            f"{ratio('speedup_vs_compile', 10)} {ratio('speedup_vs_unfused', 10)} "
            f"{ratio('x_roofline', 10)} {row['spread']:>6.0%}"
            + (" noisy" if row["noisy"] else ""))


def _write(path: str, rows: list[dict], machine: dict) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if path.endswith(".csv"):
        keys = sorted({k for row in rows for k in row})
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        return
    with open(path, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Whole models: the rows a user decides by
# ---------------------------------------------------------------------------------------------


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


E2E_MODELS = {"small-cnn": (small_cnn, (32, 3, 32, 32)), "resnet18": (resnet18, (16, 3, 112, 112))}
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


def run_e2e(args: argparse.Namespace) -> int:
    import copy

    import batchnorm

    threads = [int(t) for t in args.threads.split(",")]
    layouts = [lay.strip() for lay in args.layouts.split(",")]
    rounds, repeat = args.rounds or 5, args.repeat or (2 if args.quick else 3)
    machine = _machine()
    print(f"# batchnorm bench --e2e{' --compile' if args.compile else ''}: float32 training "
          f"steps (forward, backward, SGD), "
          f"torch {machine['torch']}, CPU kernels {machine['cpu_kernels']}, "
          f"THP_MEM_ALLOC_ENABLE={machine['THP_MEM_ALLOC_ENABLE']}, "
          f"load {machine['loadavg_start']}")
    print(f"{'model':>10} {'layout':>8} {'thr':>3} {'torch.nn ms':>12} {'ours ms':>10} "
          f"{'no-BN ms':>10} {'vs torch':>8} {'BN share':>8} {'spread':>6}")
    rows, wrong = [], False
    saved_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for name, (factory, shape) in (COMPILED_MODELS if args.compile
                                           else E2E_MODELS).items():
                for layout in layouts:
                    torch.manual_seed(0)
                    reference = factory()
                    fmt = (torch.channels_last if layout == "channels_last"
                           else torch.contiguous_format)
                    reference = reference.to(memory_format=fmt)
                    models = {"torch": reference,
                              "ours": batchnorm.convert(copy.deepcopy(reference)),
                              "no-bn": _without_bn(copy.deepcopy(reference))}
                    if args.compile:
                        _allow_recompiles()
                        models = {k: torch.compile(m) for k, m in models.items()}
                    x = torch.randn(shape).contiguous(memory_format=fmt)
                    target = torch.randint(0, 10, (shape[0],))
                    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01)
                                  for k, m in models.items()}
                    # one step each from the same weights: ours must match torch.nn first
                    losses = {k: float(_train_step(m, x, target, optimizers[k]).detach())
                              for k, m in models.items() if k != "no-bn"}
                    ok = abs(losses["ours"] - losses["torch"]) <= 1e-4 * max(1.0, abs(
                        losses["torch"]))
                    grads_ok = all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(
                        models["ours"].parameters(), models["torch"].parameters(), strict=True))
                    wrong |= not (ok and grads_ok)
                    round_ms = {k: [] for k in models}
                    for _ in range(rounds):
                        for k, m in models.items():
                            round_ms[k].append(statistics.median(_times_ms(
                                lambda m=m, o=optimizers[k], x=x, t=target: _train_step(m, x, t, o),
                                repeat)))
                    ms = {k: statistics.median(v) for k, v in round_ms.items()}
                    spread = max((max(v) - min(v)) / statistics.median(v)
                                 for k, v in round_ms.items() if k != "no-bn")
                    row = {"model": name, "input": "x".join(map(str, shape)), "layout": layout,
                           "threads": n_threads, "torch_ms": ms["torch"], "ours_ms": ms["ours"],
                           "no_bn_ms": ms["no-bn"], "speedup_vs_torch": ms["torch"] / ms["ours"],
                           "bn_share_torch": 1 - ms["no-bn"] / ms["torch"], "spread": spread,
                           "noisy": spread > NOISY_SPREAD, "correct": ok and grads_ok}
                    rows.append(row)
                    print(f"{name:>10} {layout[:8]:>8} {n_threads:>3} {ms['torch']:>12.2f} "
                          f"{ms['ours']:>10.2f} {ms['no-bn']:>10.2f} "
                          f"{row['speedup_vs_torch']:>8.2f} {row['bn_share_torch']:>8.0%} "
                          f"{spread:>6.0%}" + (" noisy" if row["noisy"] else "")
                          + ("" if row["correct"] else " WRONG"), flush=True)
    finally:
        torch.set_num_threads(saved_threads)
    machine["loadavg_end"] = _machine()["loadavg_start"]
    if args.out:
        _write(args.out, rows, machine)
        print(f"# wrote {args.out}")
    if wrong:
        print("# WRONG: a converted model's step differs from torch.nn's")
    return 1 if wrong else 0
