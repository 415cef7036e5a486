"""The `batchnorm` command: a thin dispatcher to the library.

Each command lives in its own module, imported only when that command runs (so `batchnorm claims`
does not pay for matplotlib). A command module provides

    add_arguments(parser: argparse.ArgumentParser, command: str) -> None
    run(args: argparse.Namespace) -> int        # the exit status; args.command names the command

(`command` lets one module serve several commands, as batchnorm.tools.commands does.)
"""

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "paper": ("batchnorm.paper", "reproduce Figure 1 of the batch-norm paper (MNIST)"),
    "claims": ("batchnorm.claims", "check the study note's claims about batch norm numerically"),
    "bench": ("batchnorm.bench", "benchmark ours against torch.nn and torch.compile"),
    "graph": ("batchnorm.graph", "draw batch norm's computation graph with a real input's numbers"),
    "inspect": ("batchnorm.tools.commands", "list a model's BN layers, redundant biases, folds"),
    "fold": ("batchnorm.tools.commands", "fold eval-mode BN into neighbouring layers"),
    "strip-bias": ("batchnorm.tools.commands", "remove conv/linear biases that BN cancels"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: batchnorm COMMAND [options]   (batchnorm COMMAND --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"batchnorm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, summary = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"batchnorm {command}", description=summary)
    module.add_arguments(parser, command)
    args = parser.parse_args(rest)
    args.command = command
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
