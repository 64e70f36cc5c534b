"""Per-layer constants after surgery: refreshed for the new positions, then settled.

Some blocks compute plain Python constants at construction from their index or from the layer count:
DiffLlama's ``lambda_init = 0.8 - 0.6 exp(-0.3 i)``, MiniCPM3's ``scale_depth / sqrt(L)``, MiniMax's
``num_hidden_layers`` (its decay slopes are then stored as buffers). ``from_pretrained`` rebuilds every
block as ``cls(config, i)`` from the saved config, so the model in memory must hold the constants of
its new position, or the reload computes something else. :func:`refresh_constants` sets them; a layer
that moved then computes differently, unless the change is *settled*, which :func:`settle_constants`
tries, per layer, on the block's captured input, in this order:

1. **Not read.** The block's forward never reads the changed attributes (traced on the captured call):
   the value only mattered at construction (MiniMax: the slopes it gave are persistent buffers, kept).
2. **A count-derived scale of the residual branch** (one ratio ``old / new`` for every changed float):
   the residual writers (the tensors zero-init zeroes, found by probing) are multiplied by it.
3. **A named compensation** for a constant whose effect on the block is known in closed form
   (:data:`COMPENSATIONS`: DiffLlama's ``lambda_init``).

A fold (2, 3) is kept only if the block then gives its old output on the captured input (to 1e-5
relative); otherwise its parameters are restored and the change is reported, so the caller warns
that the model is not function preserving. Each fold changes saved parameters only, so the reload
computes the same.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import torch

from .discover import capture_calls, close_rel, run_block, signature

Tensor = torch.Tensor
_SCALARS = (int, float, bool, str)
_TOL = 1e-5


def refresh_constants(layers: torch.nn.ModuleList, config: Any, details: list | None = None) -> list[str]:
    """Rebuild each block on meta as ``cls(config, i)`` and take every scalar attribute that differs;
    returns ``"i.module.attr"`` for each value changed (and appends ``(i, module, attr, old, new)`` to
    ``details``). A block not built as ``cls(config, layer_idx)`` is left alone."""
    changed = []
    for i, layer in enumerate(layers):
        try:
            params = list(inspect.signature(type(layer).__init__).parameters)
        except (TypeError, ValueError):
            return changed
        if len(params) < 3 or params[2] not in ("layer_idx", "layer_id", "layer_index"):
            return changed  # not built as cls(config, layer_idx): leave it
        try:
            with torch.device("meta"):
                fresh = type(layer)(config, i)
        except Exception:  # noqa: BLE001 - a block not built as cls(config, layer_idx): leave it
            return changed
        mods = dict(fresh.named_modules())
        for name, mod in layer.named_modules():
            ref = mods.get(name)
            if ref is None or type(ref) is not type(mod):
                continue
            for attr, val in vars(ref).items():
                if attr.startswith("_") or not isinstance(val, _SCALARS) or attr == "training":
                    continue
                if attr in vars(mod) and type(vars(mod)[attr]) is type(val) and vars(mod)[attr] != val:
                    if details is not None:
                        details.append((i, name, attr, vars(mod)[attr], val))
                    setattr(mod, attr, val)
                    changed.append(f"{i}.{name}.{attr}")
    return changed


def settle_constants(model: torch.nn.Module, layers: torch.nn.ModuleList, config: Any,
                     facts: Mapping[Any, Any]) -> list[str]:
    """:func:`refresh_constants`, then settle each changed layer (module docstring); returns the
    ``"i.module.attr"`` changes left unsettled (the block computes differently than before)."""
    details: list[tuple] = []
    refresh_constants(layers, config, details)
    if not details:
        return []
    by_layer: dict[int, list[tuple]] = {}
    for i, name, attr, old, new in details:
        by_layer.setdefault(i, []).append((name, attr, old, new))
    calls = capture_calls(model, layers, config)
    left = []
    for i, ch in by_layer.items():
        if i in calls and _settle(layers[i], ch, calls[i], facts):
            continue
        left += [f"{i}.{name}.{attr}" for name, attr, _, _ in ch]
    return left


def _settle(layer: torch.nn.Module, ch: list[tuple], call: tuple, facts: Mapping[Any, Any]) -> bool:
    if _unread(layer, ch, call):
        return True
    _set(layer, ch, old=True)
    want = run_block(layer, call)
    _set(layer, ch, old=False)
    if want is None:
        return False
    f = facts.get(signature(layer.state_dict()))
    writers = tuple(f.writers) if f is not None and f.writers else ()
    for fold in (_fold_writers, _fold_named):
        saved = {k: p.detach().clone() for k, p in layer.named_parameters()}
        if fold(layer, ch, writers) and close_rel(run_block(layer, call), want, _TOL):
            return True
        params = dict(layer.named_parameters())
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
    return False


def _set(layer: torch.nn.Module, ch: list[tuple], old: bool) -> None:
    for name, attr, o, n in ch:
        setattr(layer.get_submodule(name) if name else layer, attr, o if old else n)


_TRACERS: dict[type, type] = {}


def _tracer(cls: type) -> type:
    """A subclass of ``cls`` that records which instance attributes listed in ``_traced`` are read."""
    sub = _TRACERS.get(cls)
    if sub is None:
        def __getattribute__(self, name, _base=cls):
            if name in object.__getattribute__(self, "__dict__").get("_traced", ()):
                object.__getattribute__(self, "__dict__")["_reads"].add(name)
            return _base.__getattribute__(self, name)

        sub = _TRACERS[cls] = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})
    return sub


def _unread(layer: torch.nn.Module, ch: list[tuple], call: tuple) -> bool:
    """True if the block runs on ``call`` without reading any changed attribute."""
    mods: dict[str, set[str]] = {}
    for name, attr, _, _ in ch:
        mods.setdefault(name, set()).add(attr)
    swapped = []
    try:
        for name, attrs in mods.items():
            mod = layer.get_submodule(name) if name else layer
            vars(mod)["_traced"], vars(mod)["_reads"] = attrs, set()
            swapped.append((mod, type(mod)))
            mod.__class__ = _tracer(type(mod))
        ran = run_block(layer, call) is not None
        return ran and not any(vars(mod)["_reads"] for mod, _ in swapped)
    finally:
        for mod, cls in swapped:
            mod.__class__ = cls
            vars(mod).pop("_traced", None)
            vars(mod).pop("_reads", None)


def _fold_writers(layer: torch.nn.Module, ch: list[tuple], writers: tuple[str, ...]) -> bool:
    """Every changed constant is a float with one ratio ``old / new``: scale the residual writers."""
    ratios = {o / n for _, _, o, n in ch if isinstance(o, float) and isinstance(n, float) and n}
    if len(ratios) != 1 or not all(isinstance(o, float) for _, _, o, _ in ch) or not writers:
        return False
    params = dict(layer.named_parameters())
    if not all(w in params for w in writers):
        return False
    r = ratios.pop()
    with torch.no_grad():
        for w in writers:
            params[w].mul_(r)
    return True


def _diff_attention_lambda(mod: torch.nn.Module, old: float, new: float) -> bool:
    """Differential attention (DiffLlama): ``lambda_full = exp(q1.k1) - exp(q2.k2) + lambda_init`` and
    the output is ``(1 - lambda_init) * groupnorm(a1 - lambda_full * a2)`` before ``o_proj``. Moving
    ``old -> new``: one of the exponentials absorbs ``old - new`` (the one that stays positive; its
    ``q`` moves along ``k``), and ``o_proj`` absorbs ``(1 - old) / (1 - new)``."""
    need = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    o = getattr(mod, "o_proj", None)
    if not all(isinstance(getattr(mod, n, None), torch.nn.Parameter) for n in need) or \
            not isinstance(getattr(o, "weight", None), torch.Tensor) or new == 1.0:
        return False
    d = old - new
    q, k = (mod.lambda_q1, mod.lambda_k1) if d >= 0 else (mod.lambda_q2, mod.lambda_k2)
    q64, k64 = q.detach().double(), k.detach().double()
    kk = float((k64 * k64).sum())
    if kk == 0.0:
        return False
    dot = float((q64 * k64).sum())
    target = math.log(math.exp(dot) + abs(d))
    with torch.no_grad():
        q.copy_((q64 + k64 * ((target - dot) / kk)).to(q.dtype))
        o.weight.mul_((1.0 - old) / (1.0 - new))  # a bias is added after the scale: it stays
    return True


#: attribute name -> how a module absorbs a change of it: ``fn(module, old, new) -> applied``
COMPENSATIONS: dict[str, Callable[[torch.nn.Module, float, float], bool]] = {
    "lambda_init": _diff_attention_lambda,
}


def _fold_named(layer: torch.nn.Module, ch: list[tuple], writers: tuple[str, ...]) -> bool:
    """Every changed constant has a compensation in :data:`COMPENSATIONS` that applies."""
    for name, attr, old, new in ch:
        fn = COMPENSATIONS.get(attr)
        if fn is None or not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
            return False
        if not fn(layer.get_submodule(name) if name else layer, float(old), float(new)):
            return False
    return True
