"""README command 1 (`bash scripts/demo` -> `hf-deepen demo`): the embedded default job on the real model.

The demo is the first thing a new user runs, and its own check (logits equal before and after save and
reload) is what it shows them. Two tests run it end to end through the CLI, the second with that check
made to fail; two check what it refuses before any work (a bad token count, an --out of the user's own).
"""

import json

import pytest

from hf_deepen import DepthUpscaler
from hf_deepen.cli import main
from hf_deepen.errors import ConfigError


@pytest.fixture(autouse=True)
def _needs_gguf():
    pytest.importorskip("gguf", reason="the gguf package reads the embedded model: pip install gguf")


def test_demo_upscales_checks_and_saves(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    out = tmp_path / "demo"
    before = hf_logging.get_verbosity()
    assert main(["demo", "--out", str(out), "--max-new-tokens", "3", "--threads", "1"]) == 0
    assert hf_logging.get_verbosity() == before  # quieted for the demo only: later code still hears warnings
    text = capsys.readouterr().out
    assert "-> MATCH (tolerance 1e-5)" in text and "(same tokens: True)" in text
    assert "layers         45 in the saved model" in text
    assert "\nthreads        1 (given)\n" in text  # the report's summary line: --threads covered the job
    diff = float(text.split("max |deep - base| = ")[1].split(";")[0])
    assert diff <= 1e-5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 45 and len(cfg["hf_deepen"]["new_layer_indices"]) == 15
    assert any(p.name.endswith(".safetensors") for p in out.iterdir())
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


def test_demo_fails_loudly_when_the_deeper_model_differs(tmp_path, monkeypatch, capsys):
    """The demo's check can fail: new layers inserted without zero-init change the logits."""
    real = DepthUpscaler.upscale

    def not_preserving(self, **kw):
        return real(self, **{**kw, "zero_init": False})

    monkeypatch.setattr(DepthUpscaler, "upscale", not_preserving)
    with pytest.raises(SystemExit, match="does not reproduce the base model's logits"):
        main(["demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "1", "--threads", "1"])
    assert "MISMATCH" in capsys.readouterr().out


def test_demo_refuses_a_bad_token_count(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--max-new-tokens", "0"])
    assert e.value.code == 2 and "--max-new-tokens takes a positive integer" in capsys.readouterr().err


def test_demo_never_replaces_a_directory_of_the_users(tmp_path, capsys, monkeypatch):
    from hf_deepen.demo import check_demo_out

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("three years of work")
    loaded = []
    monkeypatch.setattr(DepthUpscaler, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    assert main(["demo", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "is not an earlier hf_deepen output" in err and "choose another --out" in err
    assert (mine / "thesis.txt").read_text() == "three years of work" and not loaded  # refused before loading
    (mine / "config.json").write_text(json.dumps({"model_type": "llama"}))  # someone else's model: refused too
    with pytest.raises(ConfigError, match="not an earlier hf_deepen output"):
        check_demo_out(str(mine))
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps({"model_type": "llama", "hf_deepen": {"stages": []}}))
    check_demo_out(str(ours))  # an earlier output: replaced
    check_demo_out(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    check_demo_out(str(tmp_path / "empty"))
