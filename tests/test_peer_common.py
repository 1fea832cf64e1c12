"""transformers' own common model tests (ModelTesterMixin, ConfigTester) on every Luna class.

The test files come from the transformers sdist of the installed version (see `peer_tests.py`); this module is
skipped, with the reason, where they cannot be downloaded. The tester follows ModernBERT's in transformers.
"""

import unittest
from unittest import mock

from peer_tests import ConfigTester, ModelTesterMixin, ids_tensor, random_attention_mask
from transformers.models.auto import modeling_auto

from luna_hf import (
    LunaConfig,
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
    LunaModel,
)

# ModelTesterMixin recognises heads by class name in these static tables (to build labels, and to leave the base
# model out of training tests); an out-of-tree model is added for the duration of the test class.
HEAD_TABLES = {
    "MODEL_MAPPING_NAMES": LunaModel,
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": LunaForMaskedLM,
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": LunaForSequenceClassification,
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": LunaForTokenClassification,
    "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES": LunaForMultipleChoice,
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": LunaForQuestionAnswering,
}


class LunaModelTester:
    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=512,
        projected_length=5,
        num_labels=3,
        num_choices=4,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.projected_length = projected_length
        self.num_labels = num_labels
        self.num_choices = num_choices
        # Attentions are the unpack maps (X over P): keys are the packed_length = min(l, longest row) slots of P.
        # The first row of every batch is unpadded (as in any batch padded to its longest row), so that is l.
        self.key_length = min(projected_length, seq_length)

    def get_config(self):
        return LunaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            projected_length=self.projected_length,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs_for_common(self):
        # Token ids avoid the special ids 0-2 (pad is 1): padding is given by the attention mask alone here.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        attention_mask[0] = 1
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class LunaModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = tuple(HEAD_TABLES.values())
    # The last layer's P update feeds only `packed_hidden_state` and "packed_mean" pooling, so with the default "cls"
    # pooling no head loss reaches it. The mixin's all-parameters check is replaced by the exact check below.
    test_all_params_have_gradient = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for table, model_class in HEAD_TABLES.items():
            patcher = mock.patch.dict(getattr(modeling_auto, table), {"luna": model_class.__name__})
            patcher.start()
            cls.addClassCleanup(patcher.stop)

    def setUp(self):
        self.model_tester = LunaModelTester(self)
        self.config_tester = ConfigTester(self, config_class=LunaConfig, hidden_size=37, num_attention_heads=1)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_only_the_unused_branch_of_the_last_layer_gets_no_gradient(self):
        """Token heads and "cls" pooling leave the last P update unused; "packed_mean" leaves the last X update."""
        last = f"luna.layers.{self.model_tester.num_hidden_layers - 1}."
        p_branch = (last + "pack_attention.", last + "packed_layer_norm.")
        cases = [(model_class, "cls") for model_class in self.all_model_classes[1:]]
        cases += [(LunaForSequenceClassification, "packed_mean"), (LunaForMultipleChoice, "packed_mean")]
        for model_class, pooling in cases:
            with self.subTest(model_class=model_class.__name__, pooling=pooling):
                config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
                config.classifier_pooling = pooling
                model = model_class(config).train()
                model(**self._prepare_for_class(inputs, model_class, return_labels=True)).loss.backward()
                no_gradient = {name for name, parameter in model.named_parameters() if parameter.grad is None}
                if pooling == "cls":
                    expected = {last + "packed_layer_norm.weight", last + "packed_layer_norm.bias"}
                else:
                    expected = {name for name, _ in model.named_parameters() if name.startswith(last)}
                    expected -= {name for name in expected if name.startswith(p_branch)}
                self.assertEqual(no_gradient, expected)


class LunaUntiedFixedProjectionModelTester(LunaModelTester):
    """The non-default side of every Luna option, with P longer than the input (l = 9 > n = 7)."""

    def __init__(self, parent):
        super().__init__(parent, projected_length=9)
        self.key_length = 9  # fixed projection: every row uses all l slots

    def get_config(self):
        config = super().get_config()
        config.tie_key_value = False
        config.dynamic_projection = False
        config.classifier_pooling = "packed_mean"
        return config


class LunaUntiedFixedProjectionModelTest(LunaModelTest):
    def setUp(self):
        super().setUp()
        self.model_tester = LunaUntiedFixedProjectionModelTester(self)


class LunaLearnedKernelModelTester(LunaModelTester):
    """attention_type="learned_kernel": no P; the attentions are the n x n maps of the linear attention."""

    def __init__(self, parent):
        super().__init__(parent)
        self.key_length = self.seq_length

    def get_config(self):
        config = super().get_config()
        config.update(dict(attention_type="learned_kernel", kernel_num_projections=4, kernel_num_channels=2))
        config.validate_luna_fields()
        return config


class LunaLearnedKernelModelTest(LunaModelTest):
    test_all_params_have_gradient = True  # no P: every parameter of every head gets a gradient
    test_only_the_unused_branch_of_the_last_layer_gets_no_gradient = None

    def setUp(self):
        super().setUp()
        self.model_tester = LunaLearnedKernelModelTester(self)


# The full suite runs on the defaults above; the options change only what these tests check (weights, tying, init,
# attention shapes, masks, training). The others are not collected for the variants, to keep the runtime short.
VARIANT_TESTS = (
    "test_attention_outputs",
    "test_batching_equivalence",
    "test_can_init_all_missing_weights",
    "test_determinism",
    "test_eager_matches_sdpa_inference_09",  # fp32, left padding
    "test_eager_matches_sdpa_inference_13",  # fp32, right padding
    "test_eager_matches_sdpa_inference_24",  # fp32, left padding, attention maps
    "test_hidden_states_output",
    "test_init_weights_can_init_buffers",
    "test_inputs_embeds_matches_input_ids",
    "test_load_save_without_tied_weights",
    "test_model_outputs_equivalence",
    "test_only_the_unused_branch",
    "test_resize_tokens_embeddings",
    "test_save_load",
    "test_tied_weights_keys",
    "test_training",
)
for _variant in (LunaUntiedFixedProjectionModelTest, LunaLearnedKernelModelTest):
    for _name in dir(_variant):
        _test = getattr(LunaModelTest, _name)
        if _name.startswith("test_") and not _name.startswith(VARIANT_TESTS) and callable(_test):
            setattr(_variant, _name, None)
