"""`batchnorm bench`: ours against torch.nn eager and torch.compile'd torch.nn, on the CPU
(`--device cpu`, the default) or a GPU (`--device cuda`).

Every (shape, layout, dtype, mode, thread count) is measured in this one process, the providers
interleaved round by round, and the median of all timings kept (CPU: the wall clock; CUDA:
triton.testing.do_bench, L2 flushed between calls). Before timing, each provider's outputs and
gradients are compared with torch.nn eager's in float64 on the same values: a wrong kernel
reports WRONG, never a speedup (and the command exits 1). The providers, modes, shapes and
tolerances are the tables of bench/cases.py.

Copy and roofline: every row also times a plain copy of the same input (`out.copy_(x)` into a
preallocated tensor of its layout), interleaved with the providers round by round, so a case is
set against the bandwidth of the same moment ("copy ms"; eval's "x roofline" is ours' time over
the copy's). The roofline is the one-sweep limit, the bytes a mode must move at the least
(forward: read x, write y; backward: read x and dy, write dx; a fused ReLU's backward also reads
y; a residual is read and its gradient written; see cases.MODE_TABLE), at that copy's bandwidth.
"x roofline" is ours' time / that bound.

Spread: each callable's median per round; "spread" is (slowest - fastest round) / median, the
largest of ours', torch's and the copy's. A row whose spread exceeds report.NOISY_SPREAD is
measured again (report.NOISY_RERUNS more times at most; the attempt with the smallest spread is
kept, and the row says how many it took); one still over it is marked "noisy": its ratios are
not to be relied on (a loaded machine).

Totals: on the ResNet-50 shapes, each provider's time summed over ResNet-50's BN layers (each
shape weighted by how many layers have it), per dtype, layout, mode and thread count.

`--device cuda --self-check`: a dry run of the CUDA path on the CPU (tiny shape, the Triton
kernels interpreted, wall clock): tests the harness without a GPU; its numbers mean nothing.
The full CUDA grid (12 shapes x 2 layouts x 3 dtypes x 5 modes, torch.compile compiling every
case afresh) takes tens of minutes: run slices (one --dtypes, one --layouts, or --providers
without compile) under a time limit.

`--e2e`: training steps of whole models, converted vs torch.nn (bench/e2e.py; CPU only).
"""

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from batchnorm.bench import cases, report, timing
from batchnorm.bench.cases import MODE_TABLE, MODES, PROVIDERS, RESNET50_BN

CPU_SHAPES = [(16, *chw) for chw in ((64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28),
                                     (512, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 7, 7),
                                     (2048, 7, 7))] + [(60, 100), (256, 1024), (16, 256, 2000)]
# Each device's defaults; --batch sets N of the ResNet-50 shapes on cuda.
DEFAULTS: dict[str, dict[str, Any]] = {  # per device: settings of several types
    "cpu": {"shapes": CPU_SHAPES, "quick_shapes": [(16, 64, 56, 56), (16, 256, 14, 14),
                                                   (256, 1024)],
            "dtypes": "float32", "modes": MODES, "providers": "ours,torch,compile",
            "quick_providers": "ours,torch", "threads": "1,2"},
    "cuda": {"shapes": list(RESNET50_BN), "quick_shapes": [(64, 56, 56), (256, 14, 14),
                                                          (2048, 7, 7)],
             "self_check_shapes": [(3, 5, 7)], "dtypes": "float32,float16,bfloat16",
             "modes": list(MODE_TABLE), "providers": "ours,ours-kernels,torch,compile",
             "quick_providers": "ours,ours-kernels,torch,compile"},
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
LAYOUTS = ("contiguous", "channels_last")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--device", default="cpu", choices=list(DEFAULTS),
                        help="cpu (the C++ kernels) or cuda (the Triton kernels)")
    parser.add_argument("--quick", action="store_true",
                        help="3 shapes, fewer repetitions; on cpu eager providers only (~30 s)")
    parser.add_argument("--self-check", action="store_true",
                        help="with --device cuda: dry run on the CPU (tiny shape, Triton "
                             "interpreter, wall-clock timing) to test the harness without a GPU")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shapes like 16x64x56x56 (default cpu: the "
                             "ResNet-50 BN shapes at batch 16, 60x100, 256x1024, 16x256x2000; "
                             "cuda: ResNet-50's 12 BN shapes at --batch)")
    parser.add_argument("--batch", type=int, default=16,
                        help="batch size of the default cuda shapes (default 16)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help="contiguous and/or channels_last (4D/5D shapes only)")
    parser.add_argument("--modes", default=None,
                        help=f"any of {', '.join(MODE_TABLE)} (default cpu: "
                             f"{', '.join(MODES)}; cuda: all)")
    parser.add_argument("--providers", default=None,
                        help="cpu: ours,torch,compile (default: all; --quick: ours,torch); cuda "
                             "also ours-kernels. ours-unfused is added next to ours in the "
                             "ReLU modes")
    parser.add_argument("--threads", default=None,
                        help="thread counts to run, e.g. 1,2 (default cpu: 1,2; cuda: as set)")
    parser.add_argument("--dtypes", default=None,
                        help=f"any of {', '.join(DTYPES)} (default cpu: float32; cuda: float32, "
                             "float16, bfloat16)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="cpu: timed calls per provider and round (default 5, --quick 3); "
                             "cuda: each round is one do_bench (100 ms of calls)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default cpu 5, cuda 3, --quick 3)")
    parser.add_argument("--out", default=None, help="write results to this .json or .csv file")
    parser.add_argument("--compile", action="store_true",
                        help="with --e2e: torch.compile both models (Inductor) and time the "
                             "compiled training steps, a small CNN and a ResNet basic block")
    parser.add_argument("--e2e", action="store_true",
                        help="whole-model training steps instead of single layers: a small CNN "
                             "(3x32x32, batch 32) and a ResNet-18-shaped model (112x112, "
                             "batch 16), converted vs torch.nn, with BN's share of the step")


def _fail(message: str) -> NoReturn:
    raise SystemExit(f"batchnorm bench: {message}")


def _names(text: str, allowed, what: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in allowed:
            _fail(f"--{what} are {', '.join(allowed)}; got {name!r}")
    return names


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(n) for n in item.strip().lower().split("x"))
        except ValueError:
            _fail(f"--shapes expects sizes like 16x64x56x56, got {item!r}")
        if len(shape) < 2:
            _fail(f"a shape needs at least (N, C), got {item!r}")
        shapes.append(shape)
    return shapes


def _shapes(args, defaults) -> list[tuple[int, ...]]:
    if args.shapes:
        return _parse_shapes(args.shapes)
    key = ("self_check_shapes" if args.self_check else "quick_shapes" if args.quick
           else "shapes")
    shapes = defaults[key]
    if args.device == "cuda":  # (C, H, W) at --batch
        shapes = [(args.batch, *chw) for chw in shapes]
    return shapes


def _settings(args) -> dict:
    """The run's axes, checked, from the arguments and the device's defaults."""
    defaults = DEFAULTS[args.device]
    if args.self_check and args.device != "cuda":
        _fail("--self-check is the dry run of the cuda path: use it with --device cuda")
    served = [name for name, p in PROVIDERS.items() if args.device in p.devices]
    chosen = args.providers or defaults["quick_providers" if args.quick else "providers"]
    return {
        "shapes": _shapes(args, defaults),
        "layouts": _names(args.layouts, LAYOUTS, "layouts"),
        "modes": _names(args.modes or ",".join(defaults["modes"]), list(MODE_TABLE), "modes"),
        "providers": _names(chosen, served, f"providers on {args.device}"),
        "dtypes": [DTYPES[d] for d in _names(args.dtypes or defaults["dtypes"], DTYPES, "dtypes")],
        "threads": [int(t) for t in (args.threads or defaults.get("threads")
                                     or str(torch.get_num_threads())).split(",")],
        "repeat": args.repeat or (1 if args.self_check else 3 if args.quick else 5),
        "rounds": args.rounds or (1 if args.self_check
                                  else 3 if args.quick or args.device == "cuda" else 5),
    }


def run(args: argparse.Namespace) -> int:
    if args.e2e:
        if args.device != "cpu":
            _fail("--e2e runs on the CPU only")
        threads = [int(t) for t in (args.threads or DEFAULTS["cpu"]["threads"]).split(",")]
        layouts = _names(args.layouts, LAYOUTS, "layouts")
        from batchnorm.bench import e2e

        return e2e.run(threads, layouts, args.rounds or 5, args.repeat or (2 if args.quick else 3),
                       args.compile, args.out)
    settings = _settings(args)
    if args.device == "cuda" and not _cuda_ready(args.self_check):
        return 0
    if "compile" in settings["providers"]:
        timing.allow_recompiles()
    with _serving(args.self_check):
        return sweep(args.device, args.self_check, settings, args.out)


def _cuda_ready(self_check: bool) -> bool:
    """Whether the cuda path can run here; says why not (and the command exits 0)."""
    if self_check:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            _fail("the dry run needs TRITON_INTERPRET=1 before triton is imported, and triton "
                  "was imported without it; run it in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton's decorators at import
    elif not torch.cuda.is_available():
        print("batchnorm bench: no CUDA device here; nothing to measure (skipped)")
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        print("batchnorm bench: triton is not installed (pip install 'batchnorm[gpu]'); skipped")
        return False
    torch.backends.cudnn.benchmark = True
    return True


def _serving(self_check: bool):
    """The dry run: CPU tensors on the Triton kernels (interpreted), restored after."""
    if not self_check:
        return contextlib.nullcontext()
    from batchnorm import kernels

    return kernels.serving("cpu", importlib.import_module("batchnorm.kernels.triton"), "triton")


def sweep(device_type: str, self_check: bool, settings: dict, out: str | None) -> int:
    """Every case of the settings, printed as it is measured; the totals; the file."""
    from batchnorm import kernels

    device = torch.device("cpu" if self_check else device_type)
    machine = timing.machine(device_type)
    print(f"# batchnorm bench --device {device_type}{' (self-check)' if self_check else ''}: "
          + timing.header(machine))
    names = cases.provider_names(settings["providers"], MODE_TABLE["relu-fwd-bwd"])
    rows = []
    saved_threads = torch.get_num_threads()
    try:
        for dtype in settings["dtypes"]:
            backend = kernels.backend_name(torch.empty(1, dtype=dtype, device=device))
            print(f"# {str(dtype)[6:]}, ours on the '{backend}' kernels")
            print(report.table_header(names))
            for n_threads in settings["threads"]:
                torch.set_num_threads(n_threads)
                for r in _dtype_rows(device, dtype, n_threads, settings):
                    rows.append(dict(r, backend=backend))
                    print(report.table_line(r, names), flush=True)
    finally:
        torch.set_num_threads(saved_threads)
    machine["loadavg_end"] = timing.load()
    print(f"# load at the end: {machine['loadavg_end']}")
    totals = report.totals(rows, names)
    for line in report.totals_lines(totals):
        print(line)
    if out:
        report.write(out, rows, machine, totals)
        print(f"# wrote {out}")
    return _verdict(rows)


def _dtype_rows(device, dtype, n_threads, settings):
    for shape in settings["shapes"]:
        numel = int(torch.tensor(shape).prod())
        for layout in settings["layouts"]:
            if layout == "channels_last" and len(shape) not in (4, 5):
                continue
            for mode in settings["modes"]:
                case = {"device": device.type, "shape": "x".join(map(str, shape)),
                        "layout": layout, "dtype": str(dtype)[6:], "mode": mode,
                        "threads": n_threads, "layers": RESNET50_BN.get(shape[1:], 0),
                        "bytes": numel * dtype.itemsize}
                yield _measure(case, shape, dtype, device, settings)


def _measure(case: dict, shape, dtype, device, settings) -> dict:
    """One row: every provider verified against float64 torch.nn, then timed side by side with a
    copy of the input; measured again while the spread says the ratios are unreliable."""
    mode = MODE_TABLE[case["mode"]]
    inputs = cases.make_inputs(shape, case["layout"], dtype, device, mode.backward)
    expected = cases.reference(mode, inputs)
    fns: dict[str, Callable[[], object]] = {}
    correct, errors = {}, {}
    for name in cases.provider_names(settings["providers"], mode):
        try:
            fn = PROVIDERS[name].case(mode, inputs)
            correct[name] = cases.verify(fn(), expected, mode, dtype)
            fns[name] = fn
        except Exception as error:  # noqa: BLE001  a provider failing is a result, not the end
            errors[name] = repr(error)[:300]
    fns[report.COPY] = timing.copy_of(inputs.x)
    best, attempts = None, 0
    while attempts <= report.NOISY_RERUNS and (best is None or best["noisy"]):
        ms, spread = timing.interleaved_ms(fns, device.type, settings["repeat"],
                                           settings["rounds"])
        attempts += 1
        r = report.row(case, ms, correct, errors, spread, mode.bytes_per_element)
        if best is None or r["spread"] < best["spread"]:
            best = r
    assert best is not None
    return dict(best, attempts=attempts)


def _verdict(rows: list[dict]) -> int:
    errors = report.errors_of(rows)
    for line in errors:
        print(f"# ERROR {line}")
    wrong = any(not r[key] for r in rows for key in r if key.endswith("_correct"))
    if wrong:
        print("# WRONG: some provider's outputs or gradients differ from torch.nn's")
    return 1 if wrong or errors else 0
