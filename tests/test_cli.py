import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_deepen.cli import main

from conftest import tiny_model


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "hf_deepen.cli", "upscale", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for opt in ("--method", "--solver", "--sinkhorn-reg", "--layout", "--num-layers", "--positions", "--every-k",
                "--no-zero-init", "--fusion-weight", "--restore-norm", "--gguf-file", "--trust-remote-code", "--overwrite",
                "--zero-target", "--align-on", "--calibration", "--calibration-tokens", "--sinkhorn-max-iter", "--sinkhorn-tol",
                "--threads"):
        assert opt in out.stdout, opt


def test_upscale_command(tmp_path, capsys):
    model = tiny_model("gqa")
    model.save_pretrained(tmp_path / "base")
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "out"), "--method", "avg",
               "--positions", "1,3", "--no-progress", "--report", str(tmp_path / "r.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6 -> 8" in printed and "saved" in printed
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.num_hidden_layers == 8
    assert loaded.config.hf_deepen["stages"][0]["new_layer_indices"] == [2, 5]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| avg |" in card or "avg" in card
    assert (tmp_path / "r.json").exists()
    # existing output is refused with the fix, and nothing is loaded or written
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_option_is_a_clean_error(tmp_path, capsys):
    rc = main(["upscale", "whatever", "--out", str(tmp_path / "o"), "--positions", "3,3", "--method", "solar"])
    assert rc == 2
    assert "solar" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["upscale", "x", "--out", "y", "--method", "nope"])
    assert torch is not None


def test_activation_alignment_needs_calibration_and_streams(tmp_path, capsys):
    import yaml
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tiny_model("gqa").save_pretrained(tmp_path / "base")
    vocab = {w: i for i, w in enumerate(["<unk>"] + [f"w{i}" for i in range(90)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(tmp_path / "base")
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--align-on", "activations", "--no-progress"])
    assert rc == 2 and "--calibration" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(7 * i) % 90}" for i in range(600)))
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--align-on", "activations",
               "--calibration", str(text), "--calibration-tokens", "512", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    run = yaml.safe_load((tmp_path / "o" / "hf_deepen_run.yaml").read_text())
    assert run["streaming"] is True and run["align_on"] == "activations"  # streamed, no flag needed
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_hidden_layers == 9


def test_streaming_command(tmp_path, capsys):
    tiny_model("qwen2").save_pretrained(tmp_path / "base")
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "out"), "--streaming", "--no-progress"])
    assert rc == 0
    assert "6 -> 9" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 9


def test_yaml_run_file_flags_override_and_resolved_copy(tmp_path, capsys):
    import yaml

    tiny_model("gqa").save_pretrained(tmp_path / "base")
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": str(tmp_path / "base"), "out": str(tmp_path / "out"),
                                   "method": "avg", "positions": [1, 2], "progress": False}))
    rc = main(["upscale", "--config", str(run), "--positions", "0,3"])  # the flag wins over the file
    assert rc == 0, capsys.readouterr().err
    resolved = yaml.safe_load((tmp_path / "out" / "hf_deepen_run.yaml").read_text())
    assert resolved["method"] == "avg" and resolved["positions"] == [0, 3] and resolved["zero_init"] is True
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.hf_deepen["new_layer_indices"] == [1, 5]
    # the resolved file reproduces the run
    rc = main(["upscale", "--config", str(tmp_path / "out" / "hf_deepen_run.yaml"), "--out", str(tmp_path / "again")])
    assert rc == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_yaml_unknown_key_is_an_error(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: x\nout: y\nmethod: opt\nlayout_typo: top\n")
    assert main(["upscale", "--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert "layout_typo" in err and "valid keys" in err
    assert not (tmp_path / "y").exists()


def test_eval_command_reports_loss(tmp_path, capsys):
    from hf_deepen.evaluate import heldout_loss
    from hf_deepen.io import default_gguf

    pytest.importorskip("gguf")
    d, g = default_gguf()
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. " * 40)
    rc = main(["eval", d, str(text), "--gguf-file", g, "--block-size", "32", "--max-blocks", "4", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(torch threads: 1, given)" in out
    loss = float(out.split("loss ")[1].split()[0])
    assert 0 < loss < 3  # a repeated sentence is easy for a real model; random weights give ~10.8
    with pytest.raises(ValueError, match="fewer than one block"):
        heldout_loss(tiny_model("gqa"), type("T", (), {"__call__": lambda s, t, **k: type("E", (), {"input_ids": torch.zeros(1, 3, dtype=torch.long)})()})(), "x", block_size=8)


def _no_load(monkeypatch):
    from hf_deepen import DepthUpscaler

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(DepthUpscaler, "from_pretrained", boom)


def test_upscale_streams_by_default_and_no_streaming_loads(tmp_path, monkeypatch):
    """A local safetensors directory streams with no flag (the model is never loaded); --no-streaming
    loads it; both write the same tensors; the resolved run records which path ran."""
    import yaml

    from conftest import checkpoint_tensors

    model = tiny_model("gqa")
    model.save_pretrained(tmp_path / "base")
    with monkeypatch.context() as m:
        _no_load(m)
        assert main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "m"), "--no-progress", "--no-streaming"]) == 0
    assert yaml.safe_load((tmp_path / "s" / "hf_deepen_run.yaml").read_text())["streaming"] is True
    assert yaml.safe_load((tmp_path / "m" / "hf_deepen_run.yaml").read_text())["streaming"] is False
    a, b = checkpoint_tensors(tmp_path / "s"), checkpoint_tensors(tmp_path / "m")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_keeps_the_dtype_unless_told(tmp_path, monkeypatch):
    from conftest import checkpoint_tensors

    model = tiny_model("gqa").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    _no_load(monkeypatch)
    assert main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "bf"), "--no-progress"]) == 0
    assert {t.dtype for t in checkpoint_tensors(tmp_path / "bf").values()} == {torch.bfloat16}
    assert main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "f32"), "--no-progress", "--dtype", "float32"]) == 0
    got = checkpoint_tensors(tmp_path / "f32")
    assert {t.dtype for t in got.values()} == {torch.float32}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f32").config.dtype == torch.float32
    # the same as loading the checkpoint in float32 and upscaling in memory
    monkeypatch.undo()
    assert main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "mem"), "--no-progress", "--dtype", "float32",
                 "--no-streaming"]) == 0
    ref = checkpoint_tensors(tmp_path / "mem")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)


def test_streaming_source_decides(tmp_path, monkeypatch):
    from hf_deepen.errors import DeepenError
    from hf_deepen.sources import streaming_source

    tiny_model("gqa").save_pretrained(tmp_path / "base")
    assert streaming_source(str(tmp_path / "base")) == tmp_path / "base"
    assert streaming_source(str(tmp_path / "base"), streaming=False) is None
    assert streaming_source(str(tmp_path / "base"), gguf_file="x.gguf") is None  # GGUF: loaded
    with pytest.raises(DeepenError, match="GGUF"):
        streaming_source(str(tmp_path / "base"), gguf_file="x.gguf", streaming=True)
    assert streaming_source("nobody/not-cached-anywhere") is None
    # a Hub snapshot in the local cache streams from its snapshot directory
    import huggingface_hub.constants as hc

    repo = tmp_path / "cache" / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for f in (tmp_path / "base").iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert streaming_source("org/tiny") == snap


def test_model_class_upscales_an_encoder(tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32)
    base = BertForMaskedLM(cfg).eval()
    for n, p in base.named_parameters():  # perturbed norms: the post-LN construction must carry them
        if "LayerNorm" in n:
            p.data.add_(0.1 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = base(ids).logits
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "out"), "--model-class",
               "AutoModelForMaskedLM", "--method", "copy", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    deep = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert type(deep) is BertForMaskedLM and deep.config.num_hidden_layers == 6
    with torch.no_grad():
        assert (deep(ids).logits - ref).abs().max() < 1e-4
    # a name that is not an Auto class, and a contradiction with --streaming: one-line errors
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o2"), "--model-class", "BertModel"])
    assert rc == 2 and "AutoModel" in capsys.readouterr().err
    rc = main(["upscale", str(tmp_path / "base"), "--out", str(tmp_path / "o3"), "--model-class", "AutoModel",
               "--streaming"])
    assert rc == 2 and "drop --streaming" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
