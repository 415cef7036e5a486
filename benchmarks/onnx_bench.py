"""ONNX deployment of converted models against the torch.nn models they came from: export time,
graph size and onnxruntime latency (1 thread), through both exporters.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_bench.py

Two conv nets with more than 10 batch norms each (a ResNet-style and a MobileNetV2-style one);
`batchnorm.convert` swaps their BN layers. Each model is exported by torch.onnx.export with
dynamo=False (TorchScript-based) and dynamo=True, the outputs of both onnxruntime sessions are
checked against torch first, then the two sessions are timed round-robin in one process (load
from other processes hits both alike): the median per-call latency, and ours / torch.nn. Export
times are medians of EXPORT_REPEATS alternating exports after one untimed export of each.
Writes benchmarks/onnx_bench.json; the table is in RESULTS.md.
"""

import collections
import io
import json
import os
import platform
import statistics
import time
import warnings

import onnx
import onnxruntime
import torch

import batchnorm

# ---- settings ---------------------------------------------------------------------------------
BATCH = 8
SIZE = 64            # input BATCH x 3 x SIZE x SIZE
ROUNDS = 30          # round-robin rounds; each times CALLS calls of both sessions
CALLS = 10
WARMUP = 10
EXPORT_REPEATS = 5
OUT = os.path.join(os.path.dirname(__file__), "onnx_bench.json")
# -----------------------------------------------------------------------------------------------


def conv_bn(cin, cout, kernel=3, stride=1, groups=1, act=torch.nn.ReLU):
    layers = [torch.nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              torch.nn.BatchNorm2d(cout)]
    return torch.nn.Sequential(*layers, act()) if act else torch.nn.Sequential(*layers)


class BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = torch.nn.Sequential(conv_bn(cin, cout, 3, stride),
                                        conv_bn(cout, cout, act=None))
        self.skip = (conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout
                     else torch.nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class InvertedResidual(torch.nn.Module):
    def __init__(self, cin, cout, stride, expand=4):
        super().__init__()
        hidden = cin * expand
        self.body = torch.nn.Sequential(
            conv_bn(cin, hidden, 1, act=torch.nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=torch.nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def resnet_like():  # 13 batch norms
    widths = [(32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2)]
    return torch.nn.Sequential(conv_bn(3, 32, 3, 2), *(BasicBlock(*w) for w in widths),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(128, 10))


def mobilenet_like():  # 16 batch norms
    widths = [(16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1), (32, 64, 2)]
    return torch.nn.Sequential(conv_bn(3, 16, 3, 2, act=torch.nn.ReLU6),
                               *(InvertedResidual(*w) for w in widths),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(64, 10))


NETS = {"resnet-like": resnet_like, "mobilenet-like": mobilenet_like}


def trained(factory):
    """The net with running statistics away from the defaults (a few training batches)."""
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(BATCH, 3, SIZE, SIZE))
    return model.eval()


def export(model, x, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        return onnx.load_from_string(buffer.getvalue())


def session(proto):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def run(sess, x):
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def time_export(models, x, dynamo):
    for model in models.values():  # untimed: the exporter's first call loads and registers
        export(model, x, dynamo)
    times = {name: [] for name in models}
    protos = {}
    for _ in range(EXPORT_REPEATS):
        for name, model in models.items():
            start = time.perf_counter()
            protos[name] = export(model, x, dynamo)
            times[name].append(time.perf_counter() - start)
    return protos, {name: statistics.median(t) for name, t in times.items()}


def time_sessions(sessions, x):
    for sess in sessions.values():
        for _ in range(WARMUP):
            run(sess, x)
    per_round = {name: [] for name in sessions}
    for _ in range(ROUNDS):
        for name, sess in sessions.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                run(sess, x)
            per_round[name].append((time.perf_counter() - start) / CALLS)
    return per_round


def spread(samples):
    """(90th - 10th percentile) / median of the per-round times."""
    deciles = statistics.quantiles(samples, n=10)
    return (deciles[-1] - deciles[0]) / statistics.median(samples)


def main():
    torch.set_num_threads(1)
    print(f"# onnx_bench: torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.2f}, batch {BATCH}x3x{SIZE}x{SIZE}, 1 thread")
    print("| net | BNs | exporter | torch.nn nodes | ours nodes | torch.nn KiB | ours KiB | "
          "torch.nn export s | ours export s | torch.nn ms | ours ms | ours / torch.nn | spread |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for net, factory in NETS.items():
        reference = trained(factory)
        ours = batchnorm.convert(trained(factory))
        bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
        models = {"torch.nn": reference, "ours": ours}
        x = torch.randn(BATCH, 3, SIZE, SIZE)
        want = reference(x).detach()
        for dynamo in (False, True):
            protos, export_s = time_export(models, x, dynamo)
            sessions = {name: session(proto) for name, proto in protos.items()}
            for name, sess in sessions.items():  # correct first
                torch.testing.assert_close(torch.from_numpy(run(sess, x.numpy())), want,
                                           atol=1e-4, rtol=1e-4, msg=f"{net} {name}")
            per_round = time_sessions(sessions, x.numpy())
            ms = {name: 1e3 * statistics.median(t) for name, t in per_round.items()}
            nodes = {name: dict(collections.Counter(n.op_type for n in proto.graph.node))
                     for name, proto in protos.items()}
            size = {name: len(proto.SerializeToString()) / 1024 for name, proto in protos.items()}
            row = {"net": net, "bns": bns, "exporter": "dynamo" if dynamo else "torchscript",
                   "nodes": nodes, "kib": size, "export_s": export_s, "ms": ms,
                   "ratio": ms["ours"] / ms["torch.nn"],
                   "spread": max(spread(t) for t in per_round.values())}
            rows.append(row)
            count = {name: sum(n.values()) for name, n in nodes.items()}
            print(f"| {net} | {bns} | {row['exporter']} | {count['torch.nn']} | {count['ours']} | "
                  f"{size['torch.nn']:.0f} | {size['ours']:.0f} | {export_s['torch.nn']:.2f} | "
                  f"{export_s['ours']:.2f} | {ms['torch.nn']:.2f} | {ms['ours']:.2f} | "
                  f"{row['ratio']:.3f} | {row['spread']:.0%} |", flush=True)
    with open(OUT, "w") as f:
        json.dump({"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                   "machine": platform.processor() or platform.machine(), "batch": BATCH,
                   "size": SIZE, "rows": rows}, f, indent=1)
    print(f"# wrote {OUT}")


if __name__ == "__main__":
    main()
