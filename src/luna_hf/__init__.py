"""luna-hf: Luna (Linear Unified Nested Attention, Ma et al. 2021) for Hugging Face transformers.

Importing the package registers Luna with the Auto classes, and marks every class for remote code so that saved
folders carry the model's code (`configuration_luna.py`, `modeling_luna.py`, `modeling_luna_attention.py`,
`modeling_luna_causal.py`, `modeling_luna_vision.py`, and `transformers_compat.py`, which lets them load on other
transformers releases) and a complete `auto_map`. The encoder-decoder translation model has its own config
(`LunaSeq2SeqConfig`, model type `luna_seq2seq`) and files (`configuration_luna_seq2seq.py`,
`modeling_luna_seq2seq.py`).
"""

from .supported_versions import SUPPORTED_TRANSFORMERS  # noqa: I001 (first: it refuses an unsupported transformers)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_luna import LunaConfig
from .conversion import ConversionError, convert_to_luna
from .configuration_luna_seq2seq import LunaSeq2SeqConfig
from .modeling_luna import (
    LunaForImageClassification,
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
    LunaModel,
    LunaModelOutput,
    LunaPreTrainedModel,
)
from .modeling_luna_attention import LunaCache
from .modeling_luna_causal import LunaDecoderModel, LunaForCausalLM
from .modeling_luna_seq2seq import LunaForConditionalGeneration, LunaSeq2SeqModel

__version__ = "0.1.0"

AUTO_CLASSES = {
    AutoModel: LunaModel,
    AutoModelForMaskedLM: LunaForMaskedLM,
    AutoModelForSequenceClassification: LunaForSequenceClassification,
    AutoModelForTokenClassification: LunaForTokenClassification,
    AutoModelForMultipleChoice: LunaForMultipleChoice,
    AutoModelForQuestionAnswering: LunaForQuestionAnswering,
    AutoModelForImageClassification: LunaForImageClassification,
    AutoModelForCausalLM: LunaForCausalLM,
}

AutoConfig.register(LunaConfig.model_type, LunaConfig, exist_ok=True)
LunaConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    _auto_class.register(LunaConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)

AutoConfig.register(LunaSeq2SeqConfig.model_type, LunaSeq2SeqConfig, exist_ok=True)
LunaSeq2SeqConfig.register_for_auto_class()
for _auto_class, _model_class in {
    AutoModel: LunaSeq2SeqModel,
    AutoModelForSeq2SeqLM: LunaForConditionalGeneration,
}.items():
    _auto_class.register(LunaSeq2SeqConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)


def __getattr__(name):
    # The attention transfer needs `datasets` (for its Trainer data): imported when asked for, so that `import luna_hf`
    # (and `from luna_hf import *`: the two names are not in __all__) works without it, as on the GPU image.
    if name in ("transfer_attention", "AttentionTransferResult"):
        from . import attention_transfer

        return getattr(attention_transfer, name)
    raise AttributeError(f"module 'luna_hf' has no attribute {name!r}")


__all__ = [
    "LunaForImageClassification",
    "SUPPORTED_TRANSFORMERS",
    "ConversionError",
    "convert_to_luna",
    "LunaCache",
    "LunaConfig",
    "LunaDecoderModel",
    "LunaForCausalLM",
    "LunaForConditionalGeneration",
    "LunaForMaskedLM",
    "LunaForMultipleChoice",
    "LunaForQuestionAnswering",
    "LunaForSequenceClassification",
    "LunaForTokenClassification",
    "LunaModel",
    "LunaModelOutput",
    "LunaPreTrainedModel",
    "LunaSeq2SeqConfig",
    "LunaSeq2SeqModel",
]
