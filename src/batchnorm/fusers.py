"""torch's model fusers, taught our layers.

Two of torch's fusers pick batch-norm layers by exact type, so subclassing torch.nn.BatchNorm2d
is not enough for them to see ours:

- `torch.ao.quantization.fuse_modules` looks the tuple of types up in a table: we add our types
  next to torch's, each pointing at torch's own fuser method, called with a torch.nn layer that
  holds the very same Parameter and buffer objects (so the result is exactly what the torch.nn
  model would give, eval and QAT alike). `(Conv, BatchNormReLU)` fuses as torch's
  `(Conv, BatchNorm, ReLU)`.
- `torch.fx.experimental.optimization.fuse` asks `matches_module_pattern` whether a node pair is
  (Conv/Linear, BatchNorm): we wrap that function so that our plain layers also answer to their
  torch.nn class. Fused-ReLU layers do not (fx fuse would drop the ReLU with the layer).

`fuse_conv_bn_eval` and `fuse_linear_bn_eval` need nothing: they read the layer's tensors.
Registration is additive (torch's own entries and answers are unchanged), happens once at
`import batchnorm`, and is skipped for a torch whose private tables look different (the
fusers then see only torch.nn layers again; tests/test_fusers.py fails loudly on such a torch).
A module that bound matches_module_pattern by name before `import batchnorm` (Inductor's
pre-grad passes, when imported first) keeps torch's function: it then folds only torch.nn
layers, which is correct, as before.
"""

import torch

from batchnorm import nn as ours

# Our layer -> the torch.nn layer it can stand in for in torch's fusers (same computation).
_PLAIN: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    ours.BatchNorm1d: torch.nn.BatchNorm1d, ours.BatchNorm2d: torch.nn.BatchNorm2d,
    ours.BatchNorm3d: torch.nn.BatchNorm3d}
# Our fused layer -> the torch.nn layer it computes before its ReLU.
_WITH_RELU = {ours.BatchNormReLU1d: torch.nn.BatchNorm1d,
              ours.BatchNormReLU2d: torch.nn.BatchNorm2d,
              ours.BatchNormReLU3d: torch.nn.BatchNorm3d}


def _twin(module: torch.nn.Module, cls: type[torch.nn.Module]) -> torch.nn.Module:
    """A cls layer on module's state that also shares module's hook dicts (the same dict
    objects, not copies): torch's fuser moves the first module's pre-hooks and the last one's
    hooks onto the fused module and clears them on the module it was given, which must then
    clear them on ours too, or they would fire twice."""
    twin: torch.nn.Module = ours.swap_class(module, cls)
    for key, value in module.__dict__.items():
        if "hooks" in key and isinstance(value, dict):
            twin.__dict__[key] = value
    return twin


def _as_torch(module: torch.nn.Module) -> torch.nn.Module:
    """The torch.nn layer on module's state for one of ours, module itself otherwise."""
    if type(module) in _PLAIN:
        return _twin(module, _PLAIN[type(module)])
    return module


def _through_torch(method):
    """torch's fuser method, called with our plain layers as torch.nn layers on their state."""

    def fuse(is_qat, *modules):
        return method(is_qat, *(_as_torch(m) for m in modules))

    return fuse


def _relu_split(method):
    """torch's (conv, bn, relu) fuser method for (conv, BatchNormReLU): the fused layer as a
    torch.nn layer on its state followed by a ReLU in the same mode."""

    def fuse(is_qat, conv, bn_relu):
        bn = _twin(bn_relu, _WITH_RELU[type(bn_relu)])
        return method(is_qat, conv, bn, torch.nn.ReLU().train(bn_relu.training))

    return fuse


def _register_fuse_modules() -> bool:
    try:
        from torch.ao.quantization import fuser_method_mappings as mappings

        table = mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    except (ImportError, AttributeError):
        return False
    torch_of = {theirs: mine for mine, theirs in _PLAIN.items()}
    relu_of = {theirs: mine for mine, theirs in _WITH_RELU.items()}
    added = {}
    for types, method in table.items():
        if not callable(method):
            continue
        for position, kind in enumerate(types):
            if kind in torch_of:
                key = types[:position] + (torch_of[kind],) + types[position + 1:]
                added[key] = _through_torch(method)
                # (Conv, BN, ReLU) -> also (Conv, BatchNormReLU): our layer does BN and ReLU.
                if types[position + 1:] == (torch.nn.ReLU,) and position == 1:
                    added[(types[0], relu_of[kind])] = _relu_split(method)
    for key, method in added.items():
        table.setdefault(key, method)
    return True


def _register_fx_fuse() -> bool:
    try:
        from torch.fx.experimental import optimization
    except ImportError:
        return False
    torch_matches = getattr(optimization, "matches_module_pattern", None)
    if torch_matches is None or getattr(torch_matches, "_batchnorm", False):
        return torch_matches is not None

    def matches_module_pattern(pattern, node, modules):
        if torch_matches(pattern, node, modules):
            return True
        # (first layer, BN): the first by torch's own test, the BN by its torch.nn class.
        if len(pattern) != 2 or node.op != "call_module" or not isinstance(node.target, str):
            return False
        bn = modules.get(node.target)
        return (_PLAIN.get(type(bn)) is pattern[1]
                and torch_matches(pattern[:1], node, modules))

    # marks on the function object, which mypy does not model
    matches_module_pattern._batchnorm = True  # type: ignore[attr-defined]
    matches_module_pattern.__wrapped__ = torch_matches  # type: ignore[attr-defined]
    optimization.matches_module_pattern = matches_module_pattern
    return True


def register() -> dict[str, bool]:
    """Teach torch's fusers our layers (idempotent); says which registrations took."""
    return {"fuse_modules": _register_fuse_modules(), "fx_fuse": _register_fx_fuse()}
