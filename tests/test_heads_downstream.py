"""Every head with the tools that use it: a vocabulary resize saved and reloaded (tied and untied LM heads), the
Trainer's gradient accumulation (every head and problem type: the same update as one large batch), and peft
adapters with every pooling."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from luna_hf import (
    LunaConfig,
    LunaForCausalLM,
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
)

VOCAB, LENGTH, CHOICES = 100, 10, 3


def tiny_config(**overrides) -> LunaConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  projected_length=8, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, classifier_dropout=0.0)  # fmt: skip
    values.update(overrides)
    return LunaConfig(**values)


def random_ids(*shape, seed=0):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary resize


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
@pytest.mark.parametrize("model_class", [LunaForMaskedLM, LunaForCausalLM])
def test_every_lm_head_resizes_saves_and_reloads_to_the_same_logits(model_class, tie_word_embeddings, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(tie_word_embeddings=tie_word_embeddings, is_decoder=model_class is LunaForCausalLM)
    model = model_class(config).eval()
    model.resize_token_embeddings(110)
    with torch.no_grad():
        model.get_output_embeddings().bias[100:] = torch.arange(10.0)  # the new tokens' biases must survive too
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 7)
    ids[0, 3] = 105  # a new token
    with torch.no_grad():
        logits, reloaded_logits = model(ids).logits, reloaded(ids).logits
    assert logits.shape[-1] == reloaded.config.vocab_size == 110
    torch.testing.assert_close(reloaded_logits, logits, atol=0, rtol=0)
    tied = reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    assert tied == tie_word_embeddings


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation: batch 2 x accumulation 2 must update the weights as batch 4 does. The Trainer sees `**kwargs`
# in every forward, so it passes `num_items_in_batch` and leaves the scaling to the model.


def padded_labels(shape, seed):
    """Token labels with a different number of scored positions per example (-100 elsewhere)."""
    labels = random_ids(*shape, seed=seed)
    for row in range(shape[0]):
        labels[row, 2 + 2 * row :] = -100
    return labels


def partial_multi_hot(generator) -> torch.Tensor:
    """Multi-label targets with unknown labels (-100): 5, 2 of them in the first micro-batch, 3 in the second."""
    labels = torch.randint(0, 2, (4, 3), generator=generator).float()
    labels[0, 1] = labels[1, 0] = labels[2, 2] = labels[3, 0] = labels[3, 1] = -100
    return labels


def examples_for(head: str):
    """Four examples for a head: (model class, config overrides, list of feature dicts)."""
    generator = torch.Generator().manual_seed(1)
    ids = random_ids(4, LENGTH, seed=2)
    targets = {
        "single_label": (LunaForSequenceClassification, dict(num_labels=3), dict(labels=torch.tensor([0, 2, 1, 2]))),
        "multi_label": (LunaForSequenceClassification, dict(num_labels=3, problem_type="multi_label_classification"),
                        dict(labels=torch.randint(0, 2, (4, 3), generator=generator).float())),
        "multi_label_partial": (LunaForSequenceClassification, dict(num_labels=3,
                                problem_type="multi_label_classification"), dict(labels=partial_multi_hot(generator))),
        "regression": (LunaForSequenceClassification, dict(num_labels=1),
                       dict(labels=torch.randn(4, generator=generator))),
        "regression_2": (LunaForSequenceClassification, dict(num_labels=2, problem_type="regression"),
                         dict(labels=torch.randn(4, 2, generator=generator))),
        "token": (LunaForTokenClassification, dict(num_labels=3), dict(labels=padded_labels((4, LENGTH), 3) % 3)),
        "multiple_choice": (LunaForMultipleChoice, {}, dict(input_ids=random_ids(4, CHOICES, LENGTH, seed=4),
                                                              labels=torch.tensor([0, 2, 1, 1]))),
        "question_answering": (LunaForQuestionAnswering, {}, dict(start_positions=torch.tensor([1, 2, 3, 0]),
                                                                   end_positions=torch.tensor([4, 5, 6, 2]))),
        "masked_lm": (LunaForMaskedLM, {}, dict(labels=padded_labels((4, LENGTH), 5))),
        "masked_lm_sparse": (LunaForMaskedLM, dict(sparse_prediction=True), dict(labels=padded_labels((4, LENGTH), 5))),
        "causal_lm": (LunaForCausalLM, dict(is_decoder=True), dict(labels=padded_labels((4, LENGTH), 6))),
    }  # fmt: skip
    model_class, overrides, columns = targets[head]
    columns = {"input_ids": ids, **columns}
    if head == "token":
        columns["labels"][columns["labels"] < 0] = -100
    return model_class, overrides, [{name: value[row] for name, value in columns.items()} for row in range(4)]


def weight_update(head: str, batch_size: int, accumulation: int, output_dir) -> torch.Tensor:
    model_class, overrides, examples = examples_for(head)
    torch.manual_seed(0)
    model = model_class(tiny_config(**overrides))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=examples).train()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


@pytest.mark.parametrize(
    "head",
    ["single_label", "multi_label", "multi_label_partial", "regression", "regression_2", "token", "multiple_choice",
     "question_answering", "masked_lm", "masked_lm_sparse", "causal_lm"],
)  # fmt: skip
def test_gradient_accumulation_gives_the_update_of_one_large_batch(head, tmp_path):
    one_batch = weight_update(head, batch_size=4, accumulation=1, output_dir=tmp_path / "one")
    accumulated = weight_update(head, batch_size=2, accumulation=2, output_dir=tmp_path / "accumulated")
    assert one_batch.abs().max() > 1e-4  # the step did something
    assert (accumulated.norm() / one_batch.norm()).item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(accumulated, one_batch, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_float_label_losses_skip_unknown_labels_and_otherwise_match_transformers(problem_type):
    """The loss over the known labels (not -100), as the cross-entropy losses skip -100; transformers' own mean when
    every label is known; a sum over the Trainer's count of known labels under gradient accumulation."""
    num_labels = 3 if problem_type == "multi_label_classification" else 1
    torch.manual_seed(0)
    model = LunaForSequenceClassification(tiny_config(num_labels=num_labels, problem_type=problem_type)).eval()
    ids = random_ids(4, LENGTH, seed=9)
    generator = torch.Generator().manual_seed(3)
    if problem_type == "regression":
        labels, reference = torch.randn(4, generator=generator), torch.nn.MSELoss(reduction="none")
    else:
        labels = torch.randint(0, 2, (4, 3), generator=generator).float()
        reference = torch.nn.BCEWithLogitsLoss(reduction="none")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.reshape(labels.shape)
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, reference(logits, labels).mean())
        unknown = labels.clone()
        unknown[1] = -100
        known = reference(logits, labels)[[0, 2, 3]]
        torch.testing.assert_close(model(input_ids=ids, labels=unknown).loss, known.mean())
        torch.testing.assert_close(model(input_ids=ids, labels=unknown, num_items_in_batch=torch.tensor(20)).loss,
                                   known.sum() / 20)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# peft: the learned P poolers are new at finetuning time, like the classifier; peft must train and save them


@pytest.mark.parametrize("classifier_pooling", ["cls", "packed_mean", "packed_max", "packed_attention"])
def test_lora_adapter_round_trips_every_pooling(classifier_pooling, tmp_path):
    peft = pytest.importorskip("peft", reason="pip install -e '.[deploy]'")
    torch.manual_seed(0)
    LunaForMaskedLM(tiny_config()).save_pretrained(tmp_path / "mlm")

    def classifier_from_mlm(seed):
        torch.manual_seed(seed)  # the head (and a learned pooler) is new: initialised from this seed
        return LunaForSequenceClassification.from_pretrained(
            tmp_path / "mlm", classifier_pooling=classifier_pooling, num_labels=2
        )

    model = peft.get_peft_model(
        classifier_from_mlm(seed=1),
        peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, target_modules="all-linear", r=4),
    )
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if classifier_pooling in ("packed_max", "packed_attention"):
        assert any(".pooler." in name for name in trainable)
    ids, labels = random_ids(4, LENGTH, seed=7), torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(classifier_from_mlm(seed=2), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
