#!/usr/bin/env python
"""Does a pretrained masked LM still tell its inputs apart? A check for representation collapse.

A Luna (or RoBERTa) whose token states all become the same vector still reaches the MLM loss of the unigram plateau
(it predicts frequent tokens everywhere), so the loss does not show a collapse; these numbers do. Over the first
`--num_sentences` lines of a text file:

- `token_spread`: the spread of the last layer's token states, sqrt(mean ||h - mean h||^2) / sqrt(mean ||h||^2)
  over every real token of every sentence; 0 when all states are the same vector, near 1 when they share little.
- `sentence_spread`: the same over the sentences' mean token states: how much a sentence's summary depends on it.
- `mean_cosine`: the mean cosine similarity of two token states (distinct tokens, any sentences).
- per layer: the mean norm of the attention sub-layer's output (Luna: the unpack attention) and of the residual it
  is added to (the layer's input), and the token spread of each layer's output (the embeddings first).

    python scripts/collapse_check.py outputs/luna-small --validation_file data/corpus/validation.txt
"""

import argparse
import json
import math

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

import luna_hf  # noqa: F401  (registers "luna" with the Auto classes)

COLLAPSE_THRESHOLD = 0.01  # a token spread below this: the states no longer depend on the input (see docs)


def relative_spread(states: torch.Tensor) -> float:
    """sqrt(mean ||h - mean h||^2) / sqrt(mean ||h||^2) over the rows of `states` (n, hidden)."""
    states = states.double()
    centred = states - states.mean(dim=0, keepdim=True)
    return math.sqrt(centred.pow(2).sum(-1).mean().item() / max(states.pow(2).sum(-1).mean().item(), 1e-30))


def mean_cosine(states: torch.Tensor) -> float:
    """Mean cosine similarity over the pairs of distinct rows of `states` (n, hidden)."""
    unit = torch.nn.functional.normalize(states.double(), dim=-1)
    n = unit.shape[0]
    if n < 2:
        return 1.0
    total = unit.sum(0)
    return ((total @ total - n) / (n * (n - 1))).item()  # the sum over i != j of <u_i, u_j>, divided by the pairs


def attention_outputs(base) -> list:
    """Per layer, the module whose output is the attention sub-layer's contribution to the residual: Luna's unpack
    attention (with its output projection), RoBERTa's (BERT's) attention output projection."""
    if hasattr(base, "layers") and hasattr(base.layers[0], "unpack_attention"):
        return [layer.unpack_attention for layer in base.layers]
    encoder = getattr(base, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer"):
        return [layer.attention.output.dense for layer in encoder.layer]
    return []


def read_sentences(path: str, count: int, min_characters: int = 40) -> list[str]:
    sentences = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if len(line) >= min_characters and not line.startswith("="):
                sentences.append(line)
                if len(sentences) == count:
                    break
    if len(sentences) < 2:
        raise ValueError(f"{path}: fewer than 2 lines of at least {min_characters} characters.")
    return sentences


@torch.no_grad()
def collapse_report(model, tokenizer, sentences: list[str], max_length: int = 128) -> dict:
    """The measures above for `model` (a `LunaModel`, `RobertaModel` or either's MLM) on `sentences`."""
    model.eval()
    batch = tokenizer(sentences, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    base = getattr(model, model.base_model_prefix, model)
    outputs_seen, hooks = [], []
    for module in attention_outputs(base):
        hooks.append(module.register_forward_hook(lambda module, args, output: outputs_seen.append(output)))
    try:
        outputs = base(**batch, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    real = batch["attention_mask"].bool()
    last = outputs.last_hidden_state
    report = {
        "token_spread": relative_spread(last[real]),
        "sentence_spread": relative_spread((last * real[..., None]).sum(1) / real.sum(1, keepdim=True)),
        "mean_cosine": mean_cosine(last[real]),
        "layer_token_spread": [relative_spread(states[real]) for states in outputs.hidden_states],
    }
    if outputs_seen:
        outputs_seen = [output[0] if isinstance(output, tuple) else output for output in outputs_seen]
        report["attention_output_norm"] = [output[real].norm(dim=-1).mean().item() for output in outputs_seen]
        # Each layer's input, the residual its attention output is added to.
        report["residual_norm"] = [states[real].norm(dim=-1).mean().item() for states in outputs.hidden_states[:-1]]
    report["collapsed"] = report["token_spread"] < COLLAPSE_THRESHOLD
    return report


def rounded(value, digits: int = 4):
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="A saved model folder (with its tokenizer).")
    parser.add_argument("--validation_file", default="data/corpus/validation.txt")
    parser.add_argument("--num_sentences", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # loading an MLM's encoder alone reports its unused head
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model)
    sentences = read_sentences(args.validation_file, args.num_sentences)
    report = collapse_report(model, tokenizer, sentences, args.max_length)
    print(json.dumps({key: rounded(v) for key, v in report.items()}))


if __name__ == "__main__":
    main()
