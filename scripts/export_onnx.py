#!/usr/bin/env python
"""Export a Luna model to ONNX with dynamic batch size and sequence length, and check it against PyTorch.

    pip install -e ".[deploy]"
    python scripts/export_onnx.py --model_name_or_path outputs/luna-small-sst2 --output_dir outputs/luna-small-onnx

writes `model.onnx` beside the config and the remote code, and the tokenizer in `tokenizer/` (a folder without
the model's config, so `AutoTokenizer.from_pretrained(OUTPUT/tokenizer)` needs no remote code and asks nothing:
transformers reads a folder's config.json before its tokenizer), runs a few sentences through
onnxruntime, batched and one at a time, and prints the largest difference from PyTorch. The folder is assembled
under a temporary name and appears only when the check passes; nothing that existed before is touched.

`--task` picks the head (default: the one the checkpoint was saved with): `sequence-classification` (output
`logits`), `fill-mask` (`logits`) or `feature-extraction` (`last_hidden_state`, `pooler_output` and, nested
Luna, `packed_hidden_state`). The exported graph keeps all `projected_length` slots of P (slots beyond a row's length
are masked), so `packed_hidden_state` has l slots where eager PyTorch may cut it shorter; every other output is the
same.
"""

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    HfArgumentParser,
)

from luna_hf.onnx_export import export_to_onnx, export_translation_to_onnx, greedy_translate

TASKS = {
    "sequence-classification": (AutoModelForSequenceClassification, ["logits"]),
    "fill-mask": (AutoModelForMaskedLM, ["logits"]),
    # In the order of the model's outputs (the graph's are positional); the learned kernel has no P.
    "feature-extraction": (AutoModel, ["last_hidden_state", "pooler_output", "packed_hidden_state"]),
    # Three graphs: encoder_model, decoder_model (first step), decoder_with_past_model (luna_hf.onnx_export).
    "translation": (AutoModelForSeq2SeqLM, ["logits"]),
}
SENTENCES = [
    "A gorgeous, witty and deeply moving film.",
    "The plot is dull.",
    "It is not a bad movie, but I would not watch it again, not even on a long flight with nothing else to do.",
    "Fine.",
]


@dataclass
class ExportArguments:
    model_name_or_path: str = field(metadata={"help": "A Luna folder or Hub id."})
    output_dir: str = field(metadata={"help": "Folder to create for model.onnx, config and tokenizer."})
    task: Literal["auto", "sequence-classification", "fill-mask", "feature-extraction", "translation"] = field(
        default="auto", metadata={"help": "Which head to export; auto: the one the checkpoint was saved with."})
    opset: int | None = field(default=None, metadata={"help": "ONNX opset (default: the exporter's)."})
    atol: float = field(default=1e-4, metadata={"help": "Largest allowed difference from PyTorch."})


def load(args: ExportArguments):
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise SystemExit(f"Cannot load a model config from {args.model_name_or_path!r}: {error}") from None
    if config.model_type not in ("luna", "luna_seq2seq"):
        raise SystemExit(f"{args.model_name_or_path} is a {config.model_type!r} model, not Luna. This script exports "
                         f"Luna models; for others use `optimum-cli export onnx` or torch.onnx.export.")
    if getattr(config, "image_size", None):
        raise SystemExit(f"{args.model_name_or_path} is an image model; this script exports text models. Export it "
                         "with torch.onnx.export(model, (pixel_values,), dynamo=True) (docs/vision.md).")  # fmt: skip
    task = args.task
    if (task == "translation") != (config.model_type == "luna_seq2seq") and task != "auto":
        raise SystemExit(f"--task {task} does not fit a {config.model_type!r} model: use --task auto.")
    if config.model_type == "luna_seq2seq":
        task = "translation"
    elif task == "auto":
        architecture = (config.architectures or ["LunaModel"])[0]
        task = {"LunaForSequenceClassification": "sequence-classification",
                "LunaForMaskedLM": "fill-mask"}.get(architecture, "feature-extraction")
    model_class, output_names = TASKS[task]
    if getattr(config, "attention_type", "nested") == "learned_kernel":
        output_names = [name for name in output_names if name != "packed_hidden_state"]
    model = model_class.from_pretrained(args.model_name_or_path, trust_remote_code=True).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # e.g. byte-level LRA models: random token ids stand in for sentences
    return model, tokenizer, task, output_names


def example_inputs(model, tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    longest = getattr(model.config, "max_sequence_length", model.config.max_position_embeddings)
    if tokenizer is not None:
        encoded = tokenizer(sentences, padding=True, truncation=True, max_length=longest, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    generator = torch.Generator().manual_seed(len(sentences))
    lengths = [min(8 + 5 * i, longest) for i in range(len(sentences))]
    input_ids = torch.full((len(sentences), max(lengths)), model.config.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(3, model.config.vocab_size, (length,), generator=generator)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def largest_difference(model, session, inputs: dict, output_names: list[str]) -> float:
    with torch.no_grad():
        expected = model(**inputs, return_dict=True)
    actual = session.run(output_names, {name: tensor.numpy() for name, tensor in inputs.items()})
    worst = 0.0
    for name, value in zip(output_names, actual, strict=True):
        reference = expected[name].numpy()
        if name == "packed_hidden_state":  # eager may cut P shorter; compare each row's valid slots only
            slots = reference.shape[1]
            valid = (np.arange(slots)[None, :] < inputs["attention_mask"].sum(dim=1).numpy()[:, None])[..., None]
            value, reference = value[:, :slots] * valid, reference * valid
        worst = max(worst, float(np.abs(value - reference).max()))
    return worst


def validate(model, tokenizer, path: Path, output_names: list[str], atol: float) -> float:
    """Batched (with padding) and one sentence at a time, in shapes other than the export example's."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [SENTENCES] + [[sentence] for sentence in SENTENCES]
    worst = max(largest_difference(model, session, example_inputs(model, tokenizer, batch), output_names)
                for batch in batches)
    if not worst <= atol:
        raise SystemExit(f"Validation failed: onnxruntime differs from PyTorch by {worst:.3g} > --atol {atol}. "
                         f"Nothing was written.")
    return worst


def plain_greedy(config) -> GenerationConfig:
    """Greedy decoding with none of a generation_config's constraints (forced tokens, n-gram bans, minimum length),
    which `greedy_translate` does not apply: the check compares the graphs, not the decoding rules."""
    return GenerationConfig(decoder_start_token_id=config.decoder_start_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id, max_new_tokens=16, num_beams=1, do_sample=False)


def validate_translation(model, tokenizer, paths: dict, atol: float) -> float:
    """Batched and one sentence at a time: generate()'s greedy tokens, and every step's logits along them."""
    import onnxruntime

    sessions = {name: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in paths.items()}  # fmt: skip
    worst = 0.0
    for batch in [SENTENCES] + [[sentence] for sentence in SENTENCES]:
        inputs = example_inputs(model, tokenizer, batch)
        with torch.no_grad():
            generated = model.generate(**inputs, generation_config=plain_greedy(model.config))
            expected = model(**inputs, decoder_input_ids=generated[:, :-1]).logits.numpy()
        numpy_inputs = {name: tensor.numpy() for name, tensor in inputs.items()}
        tokens, _ = greedy_translate(sessions, **numpy_inputs, config=model.config, max_new_tokens=16)
        _, scores = greedy_translate(sessions, **numpy_inputs, config=model.config, max_new_tokens=0,
                                     forced_tokens=generated[:, 1:].numpy())  # fmt: skip
        if not np.array_equal(tokens, generated[:, 1 : 1 + tokens.shape[1]].numpy()):
            raise SystemExit("Validation failed: onnxruntime's greedy translation differs from generate()'s. "
                             "Nothing was written.")  # fmt: skip
        worst = max(worst, float(np.abs(scores - expected).max()))
    if not worst <= atol:
        raise SystemExit(f"Validation failed: onnxruntime differs from PyTorch by {worst:.3g} > --atol {atol}. "
                         f"Nothing was written.")
    return worst


def export_and_validate(model, tokenizer, task, output_names, folder: Path, args) -> float:
    inputs = example_inputs(model, tokenizer, SENTENCES[:2])
    if task == "translation":
        return validate_translation(model, tokenizer, export_translation_to_onnx(model, inputs, folder, args.opset),
                                    args.atol)  # fmt: skip
    export_to_onnx(model, inputs, output_names, folder / "model.onnx", args.opset)
    return validate(model, tokenizer, folder / "model.onnx", output_names, args.atol)


def main(argv: list[str] | None = None) -> float:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists():
        raise SystemExit(f"{output_dir} exists: choose a new --output_dir (nothing is overwritten).")
    model, tokenizer, task, output_names = load(args)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        worst = export_and_validate(model, tokenizer, task, output_names, partial, args)
        model.config.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial / "tokenizer")
        for code in Path(args.model_name_or_path).glob("*.py"):  # remote code, so AutoConfig loads the folder
            shutil.copy(code, partial)
        partial.rename(output_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    graphs = ", ".join(sorted(path.name for path in output_dir.glob("*.onnx")))
    print(f"Exported {task} to {output_dir} ({graphs}; outputs {', '.join(output_names)}); largest difference "
          f"from PyTorch over {len(SENTENCES)} sentences, batched and alone: {worst:.2e}")
    return worst


if __name__ == "__main__":
    main()
