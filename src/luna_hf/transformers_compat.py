# Copyright 2026 The luna-hf authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The pieces of transformers whose name or place differs between the releases Luna supports: 5.9 to 5.x for every
model, and 4.57 for the encoder heads (folders loaded through remote code). Each name is transformers' own where the
installed release has it and a small equivalent where it does not, chosen by what the release provides (feature
detection), never by its version number.

Copied next to saved checkpoints for `trust_remote_code` with the other model files: it imports only torch and
transformers.
"""

import inspect
from types import SimpleNamespace

import torch
import transformers
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

try:
    from transformers import initialization as init
except ImportError:  # transformers 4.x initialises only the weights a checkpoint lacks, so torch's functions do
    init = SimpleNamespace(
        normal_=torch.nn.init.normal_,
        uniform_=torch.nn.init.uniform_,
        zeros_=torch.nn.init.zeros_,
        ones_=torch.nn.init.ones_,
        xavier_uniform_=torch.nn.init.xavier_uniform_,
        trunc_normal_=torch.nn.init.trunc_normal_,
    )

try:
    from transformers.utils.output_capturing import OutputRecorder, capture_outputs
except ImportError:  # transformers 4.x: the same hooks under their older names
    from transformers.utils.generic import OutputRecorder
    from transformers.utils.generic import check_model_inputs as capture_outputs

try:
    from transformers.utils.import_utils import is_tracing
except ImportError:  # transformers 4.x

    def is_tracing(tensor: torch.Tensor | None = None) -> bool:
        """Whether torch.compile, torch.export or the JIT tracer is running, or `tensor` is a fake one: then the
        models avoid Python that reads tensor values."""
        fake = tensor is not None and isinstance(tensor, torch._subclasses.FakeTensor)
        return fake or torch.compiler.is_compiling() or torch.jit.is_tracing()


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.21

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """The positions whose logits are computed: the last `logits_to_keep` (0: all), or the given indices."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]


try:
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # transformers 4.x

    def create_bidirectional_mask(config, inputs_embeds, attention_mask, encoder_hidden_states=None, **kwargs):
        """The padding mask of queries `inputs_embeds` over keys `encoder_hidden_states` (else `inputs_embeds`),
        shaped as transformers 5 shapes it: None without padding, boolean (batch, 1, queries, keys) for SDPA,
        additive float for eager attention."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        query_length = inputs_embeds.shape[1]
        mask = attention_mask[:, None, None, :].bool().expand(-1, 1, query_length, -1)
        if config._attn_implementation == "sdpa":
            return mask
        minimum = torch.finfo(inputs_embeds.dtype).min
        return torch.zeros(mask.shape, dtype=inputs_embeds.dtype, device=mask.device).masked_fill(~mask, minimum)


def attention_function(implementation: str, eager_attention_forward):
    """The attention kernel of `config._attn_implementation`: transformers' registered one (SDPA, flash, flex, ...),
    or the model's own eager function."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]  # 4.x


# transformers 5.25 renamed the cache of model outputs and of `generate()`'s model inputs from `past_key_values` to
# `cache`: the models accept both names and return the cache under the installed release's.
CACHE_OUTPUT_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def enable_activation_checkpointing(model, **checkpoint_kwargs) -> None:
    """Recompute each layer's activations in the backward pass: `activation_checkpointing_enable`, named
    `gradient_checkpointing_enable` before transformers 5.2x (which keeps the old name, deprecated)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


# The generation interface the causal and translation models are written for: generate() feeds a model only the tokens
# its cache has not read (`next_sequence_length`, transformers 5.5), and 5.9 is the oldest release they are tested on.
GENERATION_RELEASE = "5.9"


def require_generation_support(model_name: str) -> None:
    """Refuse, in one line, to build a generating model on a transformers release without that interface."""
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    if "next_sequence_length" not in parameters:
        raise ImportError(
            f"{model_name} needs transformers >= {GENERATION_RELEASE} (installed: {transformers.__version__}); the "
            f"encoder models also load on 4.57. Upgrade with: pip install 'transformers>={GENERATION_RELEASE}'"
        )


def take_cache_argument(cache, past_key_values):
    """The cache a forward was given, under either name (generate() passes the installed release's)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once, as cache= or as past_key_values=, not both.")
    return cache if cache is not None else past_key_values


__all__ = [
    "CACHE_OUTPUT_NAME",
    "GENERATION_RELEASE",
    "OutputRecorder",
    "attention_function",
    "PreTrainedConfig",
    "capture_outputs",
    "create_bidirectional_mask",
    "enable_activation_checkpointing",
    "init",
    "is_tracing",
    "require_generation_support",
    "slice_logits_to_keep",
    "take_cache_argument",
]
