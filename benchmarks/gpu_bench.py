"""GPU benchmark: our Triton kernels vs torch.nn (cuDNN) vs torch.compile, ResNet-50's BN layers.

    python benchmarks/gpu_bench.py [--out benchmarks/results/gpu_bench.json]
        [--dtypes float32,float16,bfloat16] [--layouts contiguous,channels_last]
        [--modes train_fwd,train_fwd_bwd,eval_fwd,bn_relu_fwd_bwd,bn_add_relu_fwd_bwd]
        [--providers ours,ours_kernels,torch,compile] [--batch 16] [--quick] [--self-check]

Run time: the full grid is 12 shapes x 2 layouts x 3 dtypes x 5 modes x 4 providers, and
torch.compile compiles every (shape, dtype, layout, mode) afresh (seconds each): tens of
minutes. Under a 10-minute limit run slices, e.g. one --dtypes and one --layouts per call, or
--providers ours,ours_kernels,torch first (minutes) and compile separately.

CUDA only: without a GPU it says so and exits 0. Every (shape, layout, dtype, mode) row is first
verified (ours and torch.compile against torch.nn on float64 copies of the same tensors), then
timed with triton.testing.do_bench (median, L2 flushed between repetitions), all providers side
by side in one process. Printed and written as JSON: time per provider, speedup of ours over
torch.nn and over torch.compile, and % of HBM bandwidth = bytes that must move / time / the
bandwidth of a measured device-to-device copy. Totals weight each shape by how many BN layers of
ResNet-50 have it.

Bytes that must move (n = numel * itemsize of the input), for the two-pass design of
kernels/triton.py (statistics need one full read before anything can be written):

    eval_fwd              read x, write y                                     2n
    train_fwd             read x (stats); read x, write y                     3n
    train_fwd_bwd         3n forward; read dy, x (sums); read dy, x, write dx 8n
    bn_relu_fwd_bwd       as train_fwd_bwd, and the backward reads y twice    10n
    bn_add_relu_fwd_bwd   bn_relu_fwd_bwd + read residual + write its grad    12n

Providers: ours = batchnorm.functional.batch_norm (custom ops + autograd, what users run);
ours_kernels = the four kernels called directly (no dispatch or autograd overhead: the
kernels' own speed); torch = torch.nn.functional (cuDNN); compile = torch.compile of the torch
code (inductor's own Triton kernels).
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as TF

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

# (C, H, W) of ResNet-50's (torchvision, v1.5) BatchNorm2d inputs at 224x224, and how many layers
# have that shape. 53 layers in all.
RESNET50_BN = [
    ((64, 112, 112), 1),
    ((64, 56, 56), 6),
    ((256, 56, 56), 4),
    ((128, 56, 56), 1),
    ((128, 28, 28), 7),
    ((512, 28, 28), 5),
    ((256, 28, 28), 1),
    ((256, 14, 14), 11),
    ((1024, 14, 14), 7),
    ((512, 14, 14), 1),
    ((512, 7, 7), 5),
    ((2048, 7, 7), 4),
]
QUICK = [((64, 56, 56), 6), ((256, 14, 14), 11), ((2048, 7, 7), 4)]
MODES = ["train_fwd", "train_fwd_bwd", "eval_fwd", "bn_relu_fwd_bwd", "bn_add_relu_fwd_bwd"]
BYTES_PER_ELEMENT_PASS = {"eval_fwd": 2, "train_fwd": 3, "train_fwd_bwd": 8,
                          "bn_relu_fwd_bwd": 10, "bn_add_relu_fwd_bwd": 12}
PROVIDERS = ["ours", "ours_kernels", "torch", "compile"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Verification tolerances against float64, by dtype (outputs and gradients of order 1).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}
EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# One benchmark case: tensors and one callable per provider
# ---------------------------------------------------------------------------------------------


class Case:
    """Tensors for one (shape, layout, dtype); weight/bias float32 as under autocast."""

    def __init__(self, shape, layout, dtype, device):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        gen = torch.Generator(device=device).manual_seed(0)
        C = shape[1]

        def tensor(*size, scale=1.0, offset=0.0):
            t = torch.randn(*size, generator=gen, device=device) * scale + offset
            return t

        self.x = tensor(*shape, scale=2.0, offset=0.5).to(dtype).contiguous(memory_format=fmt)
        self.residual = tensor(*shape).to(dtype).contiguous(memory_format=fmt)
        self.grad = tensor(*shape).to(dtype).contiguous(memory_format=fmt)
        self.weight = tensor(C, scale=0.5, offset=1.0)
        self.bias = tensor(C, scale=0.5)
        self.running_mean = torch.zeros(C, device=device)
        self.running_var = torch.ones(C, device=device)

    def leaves(self, residual):
        """Fresh autograd leaves: (x, weight, bias[, residual])."""
        out = [self.x.detach().requires_grad_(), self.weight.detach().requires_grad_(),
               self.bias.detach().requires_grad_()]
        if residual:
            out.append(self.residual.detach().requires_grad_())
        return out


def _torch_bn(x, rm, rv, w, b, training, residual=None, relu=False):
    y = TF.batch_norm(x, rm, rv, w, b, training, 0.1, EPS)
    if residual is not None:
        y = y + residual
    return TF.relu(y) if relu else y


def _ours_bn(x, rm, rv, w, b, training, residual=None, relu=False):
    from batchnorm import functional

    return functional.batch_norm(x, rm, rv, w, b, training, 0.1, EPS, residual=residual,
                                 relu=relu)


_compiled = {}


def _compile_bn(x, rm, rv, w, b, training, residual=None, relu=False):
    key = (training, residual is not None, relu)
    if key not in _compiled:
        _compiled[key] = torch.compile(_torch_bn, dynamic=False)
    return _compiled[key](x, rm, rv, w, b, training, residual, relu)


def _kernels_bn(case, mode):
    """The four kernels called directly: the work of one mode without dispatch or autograd."""
    from batchnorm.kernels import triton as K

    x, w, b = case.x, case.weight, case.bias
    count = x.numel() // x.shape[1]
    residual = case.residual if mode == "bn_add_relu_fwd_bwd" else None
    relu = mode in ("bn_relu_fwd_bwd", "bn_add_relu_fwd_bwd")

    def run():
        if mode == "eval_fwd":
            invstd = torch.rsqrt(case.running_var + EPS)
            return K.elemt(x, case.running_mean, invstd, w, b, None, False)
        mean, m2 = K.stats(x)
        invstd = torch.rsqrt(m2 / count + EPS)
        y = K.elemt(x, mean, invstd, w, b, residual, relu)
        if mode == "train_fwd":
            return y
        sum_dy, sum_dy_xhat = K.backward_reduce(case.grad, x, mean, invstd, y if relu else None)
        return K.backward_elemt(case.grad, x, mean, invstd, w, sum_dy / count,
                                sum_dy_xhat / count, y if relu else None)

    return run


def make_runner(provider, case, mode):
    """A no-argument callable doing the mode's work once with this provider."""
    if provider == "ours_kernels":
        return _kernels_bn(case, mode)
    bn = {"ours": _ours_bn, "torch": _torch_bn, "compile": _compile_bn}[provider]
    rm, rv = case.running_mean, case.running_var
    if mode in ("eval_fwd", "train_fwd"):
        training = mode == "train_fwd"

        def forward():
            with torch.no_grad():
                return bn(case.x, rm, rv, case.weight, case.bias, training)

        return forward
    residual = mode == "bn_add_relu_fwd_bwd"
    relu = mode != "train_fwd_bwd"
    leaves = case.leaves(residual)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        y = bn(leaves[0], rm, rv, *leaves[1:3], True, leaves[3] if residual else None, relu)
        y.backward(case.grad)
        return y

    return forward_backward


# ---------------------------------------------------------------------------------------------
# Verification: ours and compile against float64 torch on the same values
# ---------------------------------------------------------------------------------------------


def verify(provider, case, mode):
    """Max abs error of the output and every gradient against float64 torch.nn; (error, ok)."""
    residual = mode == "bn_add_relu_fwd_bwd"
    relu = mode in ("bn_relu_fwd_bwd", "bn_add_relu_fwd_bwd")
    training = mode != "eval_fwd"
    backward = mode.endswith("fwd_bwd")
    rm64 = case.running_mean.double()
    rv64 = case.running_var.double()
    leaves64 = [t.double().requires_grad_(backward) for t in
                (case.x, case.weight, case.bias) + ((case.residual,) if residual else ())]
    y64 = _torch_bn(leaves64[0], rm64.clone(), rv64.clone(), *leaves64[1:3], training,
                    leaves64[3] if residual else None, relu)
    if provider == "ours_kernels":  # returns the output, or grad_input in backward modes
        outputs = [make_runner(provider, case, mode)()]
        expected = ([y64] if not backward else
                    list(torch.autograd.grad(y64, leaves64[0], case.grad.double())))
    else:
        leaves = case.leaves(residual)
        for leaf in leaves:
            leaf.requires_grad_(backward)
        bn = {"ours": _ours_bn, "compile": _compile_bn}[provider]
        y = bn(leaves[0], case.running_mean.clone(), case.running_var.clone(), *leaves[1:3],
               training, leaves[3] if residual else None, relu)
        outputs, expected = [y], [y64]
        if backward:
            outputs += list(torch.autograd.grad(y, leaves, case.grad))
            expected += list(torch.autograd.grad(y64, leaves64, case.grad.double()))
    count = case.x.numel() // case.x.shape[1]
    error = 0.0
    for ours, ref in zip(outputs, expected, strict=True):
        # per-channel results (weight, bias grads) sum `count` terms of order 1
        typical = math.sqrt(count) if ours.dim() == 1 else 1.0
        ours, ref = ours.detach().double(), ref.detach()
        error = max(error, float(((ours - ref).abs() / (typical + ref.abs())).max()))
    ok = math.isfinite(error) and error <= TOLERANCE[case.x.dtype]
    return error, ok


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def bench(fn, self_check=False) -> float:
    """Median milliseconds of fn; on the GPU triton's do_bench (L2 flushed between runs)."""
    if self_check:  # CPU dry run of this script: wall clock, 3 runs
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[1] * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_copy_bandwidth(device, self_check=False) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**20 if self_check else 2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), self_check)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def run(args) -> int:
    from batchnorm import kernels

    with contextlib.ExitStack() as stack:
        if args.self_check:  # CPU tensors on the Triton kernels (interpreted), restored after
            stack.enter_context(kernels.serving(
                "cpu", importlib.import_module("batchnorm.kernels.triton"), "triton"))
        return _run(args)


def _run(args) -> int:
    from batchnorm import kernels

    if args.self_check:
        device, shapes, name = torch.device("cpu"), [((3, 5, 7), 2)], "cpu (self-check)"
        # CPU tensors on the Triton kernels (interpreted), as CUDA tensors are on a GPU
    else:
        device, shapes = torch.device("cuda"), QUICK if args.quick else RESNET50_BN
        name = torch.cuda.get_device_properties(device).name
    copy_bandwidth = measure_copy_bandwidth(device, args.self_check)
    print(f"{name}: measured copy bandwidth {copy_bandwidth / 1e9:.0f} GB/s", flush=True)
    rows, failures = [], 0
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for layout in args.layouts:
            for (C, H, W), layers in shapes:
                shape = (args.batch, C, H, W)
                case = Case(shape, layout, dtype, device)
                backend = kernels.backend_name(case.x)
                for mode in args.modes:
                    row = {"shape": list(shape), "layout": layout, "dtype": dtype_name,
                           "mode": mode, "layers": layers, "backend": backend, "ms": {},
                           "verify": {}}
                    for provider in args.providers:
                        try:
                            if provider in ("ours", "compile", "ours_kernels"):
                                error, ok = verify(provider, case, mode)
                                row["verify"][provider] = {"max_rel_error": error, "ok": ok}
                                failures += not ok
                            runner = make_runner(provider, case, mode)
                            row["ms"][provider] = bench(runner, args.self_check)
                        except Exception as error:  # noqa: BLE001  a provider failing is a result
                            row["ms"][provider] = None
                            row.setdefault("errors", {})[provider] = repr(error)[:300]
                    moved = BYTES_PER_ELEMENT_PASS[mode] * case.x.numel() * case.x.element_size()
                    ms = row["ms"]
                    if ms.get("ours"):
                        row["hbm_fraction_ours"] = moved / (ms["ours"] * 1e-3) / copy_bandwidth
                    if ms.get("ours_kernels"):
                        row["hbm_fraction_ours_kernels"] = (
                            moved / (ms["ours_kernels"] * 1e-3) / copy_bandwidth)
                    for other in ("torch", "compile"):
                        if ms.get("ours") and ms.get(other):
                            row[f"speedup_vs_{other}"] = ms[other] / ms["ours"]
                    rows.append(row)
                    print(_format_row(row), flush=True)
    totals = _totals(rows, args)
    for line in totals["lines"]:
        print(line)
    result = {
        "device": name,
        "copy_bandwidth_GBps": copy_bandwidth / 1e9,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "batch": args.batch,
        "bytes_per_element_pass": BYTES_PER_ELEMENT_PASS,
        "rows": rows,
        "totals": totals["table"],
        "verification_failures": failures,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}; verification failures: {failures}")
    return 1 if failures else 0


def _format_row(row) -> str:
    ms = row["ms"]
    cells = " ".join(f"{p} {ms[p]:.4f}" if ms.get(p) else f"{p} --" for p in ms)
    extra = ""
    if "speedup_vs_torch" in row:
        extra += f" x{row['speedup_vs_torch']:.2f} vs torch"
    if "speedup_vs_compile" in row:
        extra += f" x{row['speedup_vs_compile']:.2f} vs compile"
    if "hbm_fraction_ours" in row:
        extra += f" {100 * row['hbm_fraction_ours']:.0f}% HBM"
    if "hbm_fraction_ours_kernels" in row:
        extra += f" (kernels {100 * row['hbm_fraction_ours_kernels']:.0f}%)"
    bad = [p for p, v in row["verify"].items() if not v["ok"]]
    flag = f" VERIFY FAILED: {bad}" if bad else ""
    return (f"{row['dtype']:8} {row['layout']:13} {str(tuple(row['shape'])):20} {row['mode']:19} "
            f"ms: {cells}{extra}{flag}")


def _totals(rows, args):
    """ResNet-50 totals per (dtype, layout, mode): sum over layers of each provider's time."""
    table, lines = [], ["", "ResNet-50 totals (ms over all BN layers, speedup of ours):"]
    for dtype_name in args.dtypes:
        for layout in args.layouts:
            for mode in args.modes:
                group = [r for r in rows if (r["dtype"], r["layout"], r["mode"])
                         == (dtype_name, layout, mode)]
                total = {}
                for provider in args.providers:
                    times = [r["ms"].get(provider) for r in group]
                    if times and all(t is not None for t in times):
                        total[provider] = sum(t * r["layers"] for t, r in zip(times, group,
                                                                              strict=True))
                entry = {"dtype": dtype_name, "layout": layout, "mode": mode, "ms": total}
                for other in ("torch", "compile"):
                    if total.get("ours") and total.get(other):
                        entry[f"speedup_vs_{other}"] = total[other] / total["ours"]
                table.append(entry)
                cells = " ".join(f"{p} {t:.3f}" for p, t in total.items())
                speed = " ".join(f"x{entry[k]:.2f} {k[11:]}" for k in entry if
                                 k.startswith("speedup"))
                lines.append(f"{dtype_name:8} {layout:13} {mode:19} {cells}  {speed}")
    return {"table": table, "lines": lines}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_bench.json")
    parser.add_argument("--dtypes", default=",".join(DTYPES), type=lambda s: s.split(","))
    parser.add_argument("--layouts", default="contiguous,channels_last",
                        type=lambda s: s.split(","))
    parser.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    parser.add_argument("--providers", default=",".join(PROVIDERS), type=lambda s: s.split(","))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="3 shapes instead of 12")
    parser.add_argument("--self-check", action="store_true",
                        help="dry run on the CPU (tiny shape, Triton interpreter, wall-clock "
                             "timing) to test this script without a GPU; numbers mean nothing")
    args = parser.parse_args(argv)
    for name, allowed in (("dtypes", DTYPES), ("modes", MODES), ("providers", PROVIDERS),
                          ("layouts", ("contiguous", "channels_last"))):
        unknown = [v for v in getattr(args, name) if v not in allowed]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}, expected some of {list(allowed)}")
    if args.self_check:
        # before batchnorm.kernels.triton is imported: its kernels run in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing to measure (skipped)")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_bench: triton is not installed (pip install 'batchnorm[gpu]'); skipped")
        return 0
    torch.backends.cudnn.benchmark = True
    # one compiled graph per shape, dtype and layout: past the default limit (8) dynamo would
    # silently run eager, and "compile" would measure torch.nn again
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                  "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 4096)
    start = time.time()
    code = run(args)
    print(f"gpu_bench: {time.time() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
