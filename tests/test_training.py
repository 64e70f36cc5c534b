"""Training integration: freezing, LoRA on new layers, summaries, and the example scripts (tiny budget)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_deepen import ConfigError, DepthUpscaler, new_layer_indices
from hf_deepen.training import (
    default_target_modules,
    freeze_base_layers,
    lora_config_for_new_layers,
    new_layer_parameter_names,
    trainable_summary,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def upscaled(method: str = "opt", **kw) -> LlamaForCausalLM:
    # the paper's top layout: fixed positions (new layers 2 and 4) that the assertions below name
    return DepthUpscaler(tiny()).upscale(method=method, progress=False, **{"layout": "top", **kw})


def layer_numel(model, idx) -> int:
    return sum(p.numel() for i in idx for p in model.model.layers[i].parameters())


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


# ---- freeze_base_layers ---------------------------------------------------------------------------
def test_freeze_counts_match_new_layers(capsys):
    model = upscaled()
    new = new_layer_indices(model)
    assert new == [2, 4] and model.config.num_hidden_layers == 6
    out = freeze_base_layers(model)
    assert out["new_layers"] == new
    assert out["trainable"] == layer_numel(model, new) == 2 * layer_numel(model, [0])
    assert out["total"] == sum(p.numel() for p in model.parameters())
    for name, p in model.named_parameters():
        assert p.requires_grad == (layer_of(name) in new), name
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert "new layers [2, 4]" in capsys.readouterr().out
    assert new_layer_parameter_names(model) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_refreezes_and_respects_stage_and_layers():
    model = DepthUpscaler(upscaled()).upscale(method="avg", layout="top", progress=False)  # 4 -> 6 -> 9 layers
    assert new_layer_indices(model) == [2, 3, 5, 6, 7]
    for p in model.parameters():
        p.requires_grad_(True)
    assert freeze_base_layers(model, stage=-1, verbose=False)["new_layers"] == [3, 5, 7]
    assert freeze_base_layers(model, stage=0, verbose=False)["new_layers"] == [2, 6]
    out = freeze_base_layers(model, layers=[8], verbose=False)
    assert out["new_layers"] == [8] and out["trainable"] == layer_numel(model, [8])
    with pytest.raises(ConfigError, match="stage=5"):
        freeze_base_layers(model, stage=5)
    with pytest.raises(ConfigError, match="out of range"):
        freeze_base_layers(model, layers=[9])


def test_freeze_without_provenance_names_the_fix():
    model = tiny()
    with pytest.raises(ConfigError) as e:
        freeze_base_layers(model)
    assert isinstance(e.value, ValueError)
    assert "DepthUpscaler" in str(e.value) and "layers=" in str(e.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing touched
    with pytest.raises(ConfigError):
        lora_config_for_new_layers(model)


def test_freeze_after_save_and_reload(tmp_path):
    model = upscaled()
    expect = freeze_base_layers(model, verbose=False)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    got = freeze_base_layers(again, verbose=False)
    assert got == expect
    assert {n for n, p in again.named_parameters() if p.requires_grad} == new_layer_parameter_names(model)


def test_trainer_step_moves_only_new_layers(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = upscaled()
    freeze_base_layers(model, verbose=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 101, (8, 16), generator=g).tolist()
    ds = Dataset.from_dict({"input_ids": data, "labels": data})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=ds).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == new_layer_parameter_names(model)


# ---- LoRA -----------------------------------------------------------------------------------------
def lora_layers(peft_model) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for name, _ in peft_model.named_parameters():
        if "lora_" in name:
            module = name.split(".lora_")[0].rsplit(".", 1)[-1]
            out.setdefault(layer_of(name), set()).add(module)
    return out


def test_lora_config_targets_new_layers_only():
    from peft import get_peft_model

    model = upscaled()
    assert set(default_target_modules(model)) == PROJ
    cfg = lora_config_for_new_layers(model, r=4, alpha=8)
    assert cfg.layers_to_transform == [2, 4] and cfg.layers_pattern == "layers"
    assert set(cfg.target_modules) == PROJ and cfg.r == 4 and cfg.lora_alpha == 8
    pm = get_peft_model(model, cfg)
    assert lora_layers(pm) == {2: PROJ, 4: PROJ}
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert "layers with trainable params: [2, 4]" in trainable_summary(pm)

    # a step moves LoRA weights; merging changes only the new layers' projections
    base = {k.replace(".base_layer", ""): v.clone() for k, v in pm.get_base_model().state_dict().items()
            if "lora_" not in k}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = pm.merge_and_unload()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and {layer_of(k) for k in changed} == {2, 4}
    assert {k.split(".")[-2] for k in changed} <= PROJ
    assert new_layer_indices(merged) == [2, 4]


def test_lora_after_reload_and_options(tmp_path):
    from peft import get_peft_model

    model = upscaled()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    cfg = lora_config_for_new_layers(again, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, stage=-1)
    assert cfg.lora_dropout == 0.1 and cfg.layers_to_transform == [2, 4]
    assert lora_layers(get_peft_model(again, cfg)) == {2: {"q_proj", "v_proj"}, 4: {"q_proj", "v_proj"}}
    with pytest.raises(ConfigError, match="list of module names"):
        lora_config_for_new_layers(again, target_modules="q_proj")


def test_trainable_summary_flags_mismatch():
    model = upscaled()
    freeze_base_layers(model, layers=[0, 2], verbose=False)
    s = trainable_summary(model)
    assert "new (hf_deepen provenance): [2, 4]" in s
    assert "base layers [0] are trainable" in s and "new layers [4] are frozen" in s
    model.lm_head.weight.requires_grad_(True)
    assert "lm_head.weight" in trainable_summary(model)


# ---- example scripts (subprocesses, tiny model, 2 steps) ----------------------------------------
def run_example(cmd: list[str], out: Path, timeout: int = 120) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "HF_HOME": str(out / "hf_home")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["eval_loss_before"]) and math.isfinite(metrics["eval_loss_after"])
    assert metrics["eval_loss_before"] > 4.0  # a random model over ~260 tokens: near log(260) = 5.56
    return metrics


def check_saved(path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 6 and new_layer_indices(model) == [1, 4]  # the tiny examples: layout auto


def test_example_cpt(tmp_path):
    m = run_example([sys.executable, "examples/cpt_new_layers.py", "--tiny", "--max-steps", "2", "--seq-len", "64",
                     "--out", str(tmp_path)], tmp_path)
    assert m["new_layers"] == [1, 4] and m["frozen_unchanged"] and m["steps"] == 2
    assert m["trainable"] < m["total"]
    check_saved(tmp_path / "model")


def test_example_sft_trl(tmp_path):
    m = run_example([sys.executable, "examples/sft_trl.py", "--tiny", "--max-steps", "2", "--seq-len", "256",
                     "--out", str(tmp_path)], tmp_path)
    assert m["new_layers"] == [1, 4] and m["eval_loss_after"] != m["eval_loss_before"]
    assert m["frozen_unchanged"] and m["changed_tensors"] == 2 * 9  # every tensor of the 2 new layers
    check_saved(tmp_path / "model")


def test_example_lora(tmp_path):
    m = run_example([sys.executable, "examples/lora_new_layers.py", "--tiny", "--max-steps", "2", "--seq-len", "64",
                     "--out", str(tmp_path)], tmp_path)
    assert m["changed_layers"] == [1, 4] and m["changed_tensors"] > 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    check_saved(tmp_path / "merged")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_example_accelerate_two_cpu_processes(tmp_path):
    # accelerate's torchrun launcher (the MULTI_GPU type of the config) + the script's --cpu: 2 gloo processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "examples/accelerate_config.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "examples/accelerate_cpt.py", "--cpu", "--tiny", "--max-steps", "2", "--seq-len", "64", "--out", str(tmp_path)]
    m = run_example(cmd, tmp_path, timeout=150)
    assert m["num_processes"] == 2 and "MULTI_CPU" in m["distributed_type"]
    assert m["new_layers"] == [1, 4] and m["steps"] == 2
    check_saved(tmp_path / "model")
