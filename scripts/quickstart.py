"""Quickstart: build a small Luna with a tokenizer, save it with its remote code, and run pipelines on it.

    python scripts/quickstart.py [--output_dir outputs/quickstart]
"""

import argparse
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast, pipeline

from luna_hf import LunaConfig, LunaForMaskedLM, LunaForSequenceClassification

TEXT = [
    "Luna packs a long input into a short sequence and unpacks it again.",
    "The packed sequence is carried from one layer to the next as contextual memory.",
    "Attention over the packed sequence costs linear time in the input length.",
] * 20


def build_tokenizer(output_dir: Path) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
    )
    tokenizer.save_pretrained(output_dir)
    return AutoTokenizer.from_pretrained(output_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    torch.manual_seed(0)

    tokenizer = build_tokenizer(output_dir)
    config = LunaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, projected_length=16, id2label={0: "negative", 1: "positive"},
    )
    model = LunaForMaskedLM(config)
    model.save_pretrained(output_dir)
    print(f"Saved a random {model.num_parameters() / 1e6:.2f}M-parameter Luna with its remote code to {output_dir}")

    fill_mask = pipeline("fill-mask", model=str(output_dir), trust_remote_code=True)
    print("fill-mask (untrained):", [p["token_str"] for p in fill_mask("Luna packs a long <mask>.", top_k=3)])

    classifier = LunaForSequenceClassification.from_pretrained(output_dir)
    inputs = tokenizer(["a linear attention", "packed and unpacked"], padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = classifier(**inputs).logits.softmax(-1)
    print("classification probabilities (untrained head):", probs.tolist())


if __name__ == "__main__":
    main()
