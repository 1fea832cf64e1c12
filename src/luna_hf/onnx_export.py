"""Export a Luna model to ONNX with dynamic batch size and sequence length (`scripts/export_onnx.py` is its command
line, with the onnxruntime check; docs/deploy.md).

    from luna_hf.onnx_export import export_to_onnx

    inputs = tokenizer(["a sentence", "another one"], padding=True, return_tensors="pt")
    export_to_onnx(model, inputs, ["logits"], "model.onnx")

The exported graph keeps all `projected_length` slots of P (slots beyond a row's length are masked), so
`packed_hidden_state` has l slots where eager PyTorch may cut it shorter; every other output is the same.
"""

from pathlib import Path

import torch


def export_to_onnx(model, inputs: dict, output_names: list[str], path, opset: int | None = None) -> Path:
    """Trace `model` on `inputs` (input_ids and attention_mask, at least 2 tokens) with torch's dynamo exporter and
    write the ONNX program to `path`; batch size and length stay dynamic up to the model's maximum length."""
    batch = torch.export.Dim("batch_size", min=1, max=4096)
    length = torch.export.Dim("sequence_length", min=2, max=model.config.max_sequence_length)
    program = torch.onnx.export(
        model, (), kwargs=dict(inputs), dynamic_shapes={name: {0: batch, 1: length} for name in inputs},
        input_names=list(inputs), output_names=output_names, opset_version=opset, dynamo=True, verbose=False,
    )  # fmt: skip
    program.save(str(path))
    return Path(path)
