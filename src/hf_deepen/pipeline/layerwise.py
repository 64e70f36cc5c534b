"""Forward passes through a checkpoint one decoder layer at a time: calibration while streaming.

``align_on="activations"`` and ``layout="auto"`` need the base model's hidden states on calibration
text. The streaming path never loads the model, so :func:`layerwise_model` builds its module tree
on the ``meta`` device (no parameter memory; buffers such as rotary frequencies are real, from the
config) and runs the model's *own* forward on it: a hook loads each decoder layer's tensors from the
checkpoint just before the layer runs and drops them right after, and the pass stops after the last
layer the caller needs (the final norm and LM head never run). The embedding rows of the calibration
tokens are looked up once and the table dropped before the first layer loads.

So every family runs with exactly the arguments its own model passes its layers (masks, rotary
embeddings, sliding/full layer types), and peak memory is the embedding table (once, before the
layers) or one decoder layer plus the calibration hidden states, whatever the model size. The
hidden states and the hooks' captures are the same as the loaded model's, computed in the
checkpoint's dtype (or the streaming ``dtype=``), so the plans equal the in-memory path's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..errors import UnsupportedModelError
from .source import SafetensorsSource


class _Done(Exception):
    """Raised by the last needed layer's hook: the rest of the forward is not needed."""


class LayerwiseRunner(torch.nn.Module):
    """Call it like the model (``runner(input_ids=ids, use_cache=False)``): it returns nothing; the
    caller's hooks on the decoder layers (or their submodules) see what they would see on the model."""

    def __init__(self, model: torch.nn.Module, last_layer: torch.nn.Module, used: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.model = model
        self._last = [last_layer]  # not a child: the model already holds it
        self._rows = rows  # [len(used), hidden]: the embeddings of the token ids in ``used``
        self._index = {int(t): i for i, t in enumerate(used)}

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> None:
        try:
            rows = torch.tensor([self._index[int(t)] for t in input_ids.flatten()], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"token id {e} was not among the ids given to layerwise_model") from None
        embeds = self._rows[rows].reshape(*input_ids.shape, -1)

        def stop(mod, args, out):
            raise _Done

        # registered now, after the caller's hooks, so theirs on the last layer still run
        h = self._last[0].register_forward_hook(stop)
        try:
            self.model(inputs_embeds=embeds, **kwargs)
        except _Done:
            pass
        finally:
            h.remove()


def _skeleton(config: Any) -> torch.nn.Module:
    """The model's module tree with parameters on ``meta`` and real (CPU) buffers."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cls = None
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            break
    with init_empty_weights(include_buffers=False):
        if cls is not None:
            return cls._from_config(config)
        return AutoModelForCausalLM.from_config(config)


def _drop(module: torch.nn.Module) -> None:
    """Put ``module``'s parameters back on ``meta`` (their memory is freed; buffers stay)."""
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[n] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


@contextmanager
def layerwise_model(source: SafetensorsSource, config: Any, layers_path: str, last: int,
                    ids: torch.Tensor) -> Iterator[tuple[LayerwiseRunner, torch.nn.ModuleList]]:
    """``(runner, layers)``: a runner that executes layers ``0 .. last`` of the checkpoint behind ``source``
    on token ids drawn from ``ids`` (their embedding rows are read now), and the skeleton's decoder
    layers to hook. Every layer's tensors are loaded when it runs and dropped after it."""
    model = _skeleton(config)
    try:
        layers = model.get_submodule(layers_path)
    except AttributeError as e:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder stack at {layers_path!r}: {e}") from e
    emb = model.get_input_embeddings()
    emb_name = next((n for n, m in model.named_modules() if m is emb), None)
    if emb_name is None or f"{emb_name}.weight" not in source.weight_map:
        raise UnsupportedModelError(
            f"the checkpoint has no input embedding tensor {emb_name}.weight: cannot run calibration while streaming;"
            " upscale in memory (DepthUpscaler.from_pretrained) instead"
        )
    # only the rows the calibration uses; the module's own forward (Gemma's scale included) computes them
    used = torch.unique(ids.flatten())
    table = source.get(f"{emb_name}.weight")
    weight = torch.nn.Parameter(table, requires_grad=False)
    emb._parameters["weight"] = weight
    with torch.no_grad():
        rows = emb(used)
    del table, weight
    _drop(emb)
    runner = LayerwiseRunner(model, layers[last], used, rows)
    model.eval()

    def load(j: int):
        def fn(mod, args, kwargs):
            missing, unexpected = mod.load_state_dict(source.read(j), strict=False, assign=True)
            params = dict(mod.named_parameters())
            left = [k for k in missing if k in params]
            if left or unexpected:
                raise UnsupportedModelError(
                    f"layer {j} of the checkpoint does not match {type(mod).__name__}: missing {left[:4]},"
                    f" unexpected {list(unexpected)[:4]}"
                )

        return fn

    def drop(mod, args, out):
        _drop(mod)

    handles = []
    for j in range(last + 1):
        handles.append(layers[j].register_forward_pre_hook(load(j), with_kwargs=True, prepend=True))
        handles.append(layers[j].register_forward_hook(drop))
    try:
        yield runner, layers
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            _drop(layer)


__all__ = ["LayerwiseRunner", "layerwise_model"]
