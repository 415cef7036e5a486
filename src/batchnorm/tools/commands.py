"""`batchnorm inspect | fold | strip-bias MODULE:FACTORY`: the model tools from the command line.

FACTORY is a callable in an importable module (the current directory is on the path) returning
a model, or (model, example_input); --input-shape gives the example input otherwise.
Checkpoints are read with torch.load(weights_only=True): a state_dict, or a dict holding one
under "state_dict" / "model".
"""

import argparse
import importlib
import os
import sys
from typing import Any

import torch
from torch import nn

__all__ = ["add_arguments", "run", "load_model", "format_inspection"]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("model", metavar="MODULE:FACTORY",
                        help="e.g. torchvision.models:resnet18 or mypkg.nets:build")
    parser.add_argument("--checkpoint", metavar="FILE", help="state_dict to load into the model")
    parser.add_argument("--input-shape", metavar="N,C,...",
                        help="shape of a random example input (default: the factory's)")
    if command in ("fold", "strip-bias"):
        parser.add_argument("--out", metavar="FILE", required=True,
                            help="where to write the new model's state_dict (torch.save)")


class CommandError(Exception):
    pass


def load_model(spec: str, checkpoint: str | None, input_shape: str | None) -> tuple[nn.Module, Any]:
    """(model, example_input) from 'module:factory', a checkpoint and an input shape."""
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise CommandError(f"expected MODULE:FACTORY (e.g. mypkg.nets:build), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise CommandError(f"cannot load {spec!r}: {exc}") from exc
    built = factory()
    model, example = built if isinstance(built, tuple) else (built, None)
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec} returned {type(model).__name__}, expected an nn.Module or "
                           f"(nn.Module, example_input)")
    if input_shape:
        try:
            shape = [int(s) for s in input_shape.split(",")]
        except ValueError as exc:
            raise CommandError(f"--input-shape expects integers like 2,3,224,224, got "
                               f"{input_shape!r}") from exc
        dtype = next(model.parameters(), torch.empty(0)).dtype
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    if example is None:
        raise CommandError(f"{spec} returned only a model; the tools need an example input to "
                           f"trace shapes: pass --input-shape N,C,H,W or return (model, input)")
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        model.load_state_dict(state)
    return model, example


def _slices(channels: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0:3, 5:7' (half-open, as Python slices)."""
    runs: list[list[int]] = []
    for c in channels:
        if runs and c == runs[-1][1]:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    return ", ".join(f"{a}:{b}" for a, b in runs)


def format_inspection(inspection) -> str:
    columns = [("bn", "BN layer"), ("type", "type"), ("channels", "C"), ("stats", "eval stats"),
               ("batches", "tracked"), ("redundant_bias", "bias it cancels (strip)"),
               ("fold", "fold")]
    rows = [[str(row[key]) for key, _ in columns] for row in inspection.rows]
    widths = [max([len(title)] + [len(r[i]) for r in rows]) for i, (_, title) in enumerate(columns)]
    widths[-1] = len(columns[-1][1])  # the last column runs free
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    p = inspection.parameters
    lines = [f"graph: {inspection.capture_summary()}", ""] + lines
    lines += [
        "",
        f"{len(inspection.rows)} BN layers; {len(inspection.redundant)} redundant biases; "
        f"{len(inspection.folds)} foldable for inference",
        f"parameters {p}: strip-bias saves {inspection.parameters_saved_by_strip} "
        f"({100 * inspection.parameters_saved_by_strip / max(p, 1):.2f}%), fold saves "
        f"{inspection.parameters_saved_by_fold} parameters "
        f"({100 * inspection.parameters_saved_by_fold / max(p, 1):.2f}%) and "
        f"{inspection.state_saved_by_fold} state_dict numbers",
    ]
    lines += [f"redundant through {', '.join(r.joins)}: {r.layer}.bias -> {r.bn} channels "
              f"{_slices(r.channels)} of {r.channel_bias.numel()}"
              for r in inspection.redundant if r.joins]
    lines += [f"biases kept: {layer}: {why}" for layer, why in inspection.kept_biases]
    if inspection.strip_error:
        lines.append(f"strip-bias: {inspection.strip_error}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from batchnorm.tools import (
        FoldReport,
        StripReport,
        TraceError,
        fold_bn,
        inspect_model,
        strip_redundant_biases,
    )

    prog = f"batchnorm {args.command}"
    report: FoldReport | StripReport
    try:
        model, example = load_model(args.model, args.checkpoint, args.input_shape)
        if args.command == "inspect":
            print(format_inspection(inspect_model(model, example)))
            return 0
        if args.command == "fold":
            new, report = fold_bn(model, example)
            how = "the model's structure: batchnorm.tools.fold_bn(model, example_input)"
        elif args.command == "strip-bias":
            new, report = strip_redundant_biases(model, example)
            how = "batchnorm.tools.strip_redundant_biases(model, example_input)"
        else:
            raise CommandError(f"unknown command {args.command!r}")
    except (CommandError, TraceError, RuntimeError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    torch.save(new.state_dict(), args.out)
    print(report.summary())
    print(f"wrote {args.out}; load it into {how}[0]")
    return 0
