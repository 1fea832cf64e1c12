"""Sparse MLM prediction (`LunaConfig.sparse_prediction`, ModernBERT's option): with labels, the head runs only on
the labelled positions and gives the dense loss and gradients; without labels every path keeps full logits."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, pipeline

from luna_hf import LunaConfig, LunaForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402
from test_modeling_luna import VOCAB, padded_batch, tiny_config  # noqa: E402


def masked_labels(input_ids, attention_mask, share=0.15, seed=0):
    """Labels for about `share` of the real tokens (at least one per row), -100 elsewhere and on padding."""
    generator = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(input_ids.shape, generator=generator) < share) & attention_mask.bool()
    chosen[:, 0] = True
    return torch.where(chosen, input_ids, -100)


def step(model, sparse, **inputs):
    """Loss, logits and the gradients of one forward/backward with sparse prediction on or off (the last layer's
    packed LayerNorm gets none: the MLM head does not read the final P)."""
    model.config.sparse_prediction = sparse
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie_word_embeddings", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("num_items", [None, 11], ids=["mean", "num_items_in_batch"])
def test_sparse_loss_and_gradients_equal_the_dense_ones(tie_word_embeddings, num_items):
    torch.manual_seed(0)
    model = LunaForMaskedLM(tiny_config(tie_word_embeddings=tie_word_embeddings)).train()
    input_ids, attention_mask = padded_batch([20, 13, 7], seq_len=24)
    labels = masked_labels(input_ids, attention_mask)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
    dense, dense_grads = step(model, False, **inputs)
    sparse, sparse_grads = step(model, True, **inputs)
    scored = labels != -100
    assert dense.logits.shape == (3, 24, VOCAB) and sparse.logits.shape == (scored.sum(), VOCAB)
    torch.testing.assert_close(sparse.logits, dense.logits[scored], rtol=0, atol=1e-6)
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=0, atol=1e-6)
    assert sparse_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_a_batch_without_scored_labels_gives_the_dense_result():
    """All labels ignored: the sparse head gets zero rows; loss (0/0 = nan, as dense) and gradients match."""
    model = LunaForMaskedLM(tiny_config()).train()
    input_ids, attention_mask = padded_batch([9, 5])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.full_like(input_ids, -100))
    dense, dense_grads = step(model, False, **inputs)
    sparse, sparse_grads = step(model, True, **inputs)
    assert sparse.logits.shape == (0, VOCAB) and sparse_grads.keys() == dense_grads.keys()
    torch.testing.assert_close(sparse.loss, dense.loss, equal_nan=True)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=0, atol=1e-6, msg=name)
        assert torch.isfinite(grad).all(), name


def test_inference_and_fill_mask_keep_full_logits():
    tokenizer = hub_fixture.build_tokenizer()
    torch.manual_seed(0)
    model = LunaForMaskedLM(hub_fixture.tiny_luna_config(tokenizer, sparse_prediction=True)).eval()
    inputs = tokenizer(["the movie was <mask> and good", "a bad <mask>"], padding=True, return_tensors="pt")
    with torch.no_grad():
        sparse = model(**inputs).logits
        as_tuple = model(**inputs, return_dict=False)[0]
        model.config.sparse_prediction = False
        dense = model(**inputs).logits
        unmasker = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=3)
        dense_fill = unmasker("the movie was <mask> and good")
        model.config.sparse_prediction = True
        sparse_fill = unmasker("the movie was <mask> and good")
    assert sparse.shape == (2, inputs.input_ids.shape[1], len(tokenizer))
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple, dense, rtol=0, atol=0)
    assert sparse_fill == dense_fill


def test_config_round_trip(tmp_path):
    assert LunaConfig().sparse_prediction is False and LunaConfig().sparse_pred_ignore_index == -100
    LunaForMaskedLM(tiny_config(sparse_prediction=True, sparse_pred_ignore_index=-1)).save_pretrained(tmp_path)
    for config in (LunaConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert config.sparse_prediction is True and config.sparse_pred_ignore_index == -1
    model = LunaForMaskedLM.from_pretrained(tmp_path)
    input_ids, attention_mask = padded_batch([6, 4])
    labels = torch.where(attention_mask.bool(), input_ids, -1)  # the configured ignore index marks the padding
    assert model(input_ids, attention_mask, labels=labels).logits.shape == (10, VOCAB)
