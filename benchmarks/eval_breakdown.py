"""Where an eval call's time goes, on the shapes where ours and torch.nn both run at a copy's
speed: the kernel (the forward_eval op called directly), the Python layers above it, and torch.

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/eval_breakdown.py [--threads 1,2] [--rounds 11]

Per shape, layout and thread count, interleaved round by round in one process (medians of
`repeat` calls per round, then the median over rounds, microseconds):
  ours   batchnorm.functional.batch_norm (what `batchnorm bench` times as ours)
  op     torch.ops.batchnorm.forward_eval, the op under it (dispatch, output, factors, kernel)
  torch  torch.nn.functional.batch_norm
  copy   out.copy_(x) into a preallocated tensor of the same layout
and the differences: ours - op (the Python layers), op - copy (what the op pays over a copy).
A 30 MB tensor is allocated and freed first: glibc then serves torch's later outputs below that
size from its heap, reused call after call, as in a process that has freed a larger tensor before
(the bench's); otherwise torch.nn's fresh 12 MB outputs fault every page on every call.

Then, at 1 thread, what a call on a tiny (2, 4, 16) input costs warm (back to back) and right
after a copy of 3.2 MB (16x256x14x14: more than the 2 MiB L2, as every shape above), which
leaves the interpreter's and the dispatcher's data out of cache: the part of each layer's
per-call cost that the rows above pay. Last, the op against torch.batch_norm (the op under
F.batch_norm) on (1, C, 1, 16) inputs, warm: the per-channel set-up as C grows.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from batchnorm import functional, ops

SHAPES = [(16, 512, 7, 7), (16, 64, 56, 56), (16, 2048, 7, 7), (16, 1024, 14, 14),
          (16, 256, 14, 14)]
LAYOUTS = ["contiguous", "channels_last"]
REPEAT = 40  # calls per provider and round
EPS = 1e-5


def median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def row(shape, layout: str, rounds: int) -> dict[str, float]:
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    weight, bias = torch.rand(C) + 0.5, torch.randn(C)
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    out = torch.empty_like(x)
    calls = {
        "ours": lambda: functional.batch_norm(x, running_mean, running_var, weight, bias, False,
                                              0.1, EPS),
        "op": lambda: ops.forward_eval(x, running_mean, running_var, weight, bias, None, False,
                                       EPS),
        "torch": lambda: F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.1,
                                      EPS),
        "copy": lambda: out.copy_(x),
    }
    rounds_us: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():  # warm-up: outputs allocated once, pools filled
            for _ in range(5):
                fn()
        for _ in range(rounds):
            for name, fn in calls.items():
                rounds_us[name].append(median_us(fn, REPEAT))
    return {name: statistics.median(us) for name, us in rounds_us.items()}


def cold_costs(rounds: int) -> None:
    torch.set_num_threads(1)
    big = torch.randn(16, 256, 14, 14)
    out = torch.empty_like(big)
    x, weight, bias = torch.randn(2, 4, 16), torch.rand(4), torch.rand(4)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    calls = {
        "op (forward_eval)": lambda: ops.forward_eval(x, running_mean, running_var, weight, bias,
                                                      None, False, EPS),
        # the same torch.ops call path to an op that does nothing but allocate its output
        "torch.ops.aten.empty_like": lambda: torch.ops.aten.empty_like.default(x),
        "ops.batch_norm_eval": lambda: ops.batch_norm_eval(x, running_mean, running_var, weight,
                                                           bias, EPS),
        "functional.batch_norm": lambda: functional.batch_norm(x, running_mean, running_var,
                                                               weight, bias, False, 0.1, EPS),
        "F.batch_norm (torch)": lambda: F.batch_norm(x, running_mean, running_var, weight, bias,
                                                     False, 0.1, EPS),
    }
    print("# 1 thread, (2, 4, 16) input, us per call: warm, and after a 3.2 MB copy")
    with torch.no_grad():
        copy_alone = statistics.median(median_us(lambda: out.copy_(big), 100)
                                       for _ in range(rounds))
        for name, fn in calls.items():
            warm = statistics.median(median_us(fn, 100) for _ in range(rounds))
            after = statistics.median(median_us(lambda fn=fn: (out.copy_(big), fn()), 100)
                                      for _ in range(rounds)) - copy_alone
            print(f"{name:>24} warm {warm:6.2f}  after the copy {after:6.2f}", flush=True)


def per_channel_costs(rounds: int) -> None:
    torch.set_num_threads(1)
    print("# 1 thread, warm, us per call on (1, C, 1, 16)")
    for C in (8, 512, 2048):
        x, weight, bias = torch.randn(1, C, 1, 16), torch.rand(C) + 0.5, torch.randn(C)
        mean, var = torch.zeros(C), torch.ones(C)
        calls = {
            "op": lambda a=(x, mean, var, weight, bias): ops.forward_eval(*a, None, False, EPS),
            "torch.batch_norm": lambda a=(x, weight, bias, mean, var): torch.batch_norm(
                *a, False, 0.1, EPS, False),
        }
        us = {name: statistics.median(median_us(fn, 300) for _ in range(rounds))
              for name, fn in calls.items()}
        print(f"{C:>8} " + "  ".join(f"{name} {t:6.2f}" for name, t in us.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    torch.manual_seed(0)
    del_after = torch.empty(30 << 18)  # 30 MB: raises glibc's mmap threshold (see above)
    del del_after
    print(f"# torch {torch.__version__}, us per call, medians of {args.rounds} rounds x {REPEAT}")
    print(f"{'shape':>14} {'layout':>8} thr {'ours':>7} {'op':>7} {'torch':>7} {'copy':>7} "
          f"{'ours-op':>7} {'op-copy':>7} {'vs torch':>8} {'op vs torch':>11}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in SHAPES:
            for layout in LAYOUTS:
                m = row(shape, layout, args.rounds)
                print(f"{'x'.join(map(str, shape)):>14} {layout[:8]:>8} {threads:>3} "
                      f"{m['ours']:7.1f} {m['op']:7.1f} {m['torch']:7.1f} {m['copy']:7.1f} "
                      f"{m['ours'] - m['op']:7.1f} {m['op'] - m['copy']:7.1f} "
                      f"{m['torch'] / m['ours']:8.3f} {m['torch'] / m['op']:11.3f}", flush=True)
    cold_costs(args.rounds)
    per_channel_costs(args.rounds)


if __name__ == "__main__":
    main()
