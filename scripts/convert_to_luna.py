#!/usr/bin/env python
"""Convert a pretrained BERT, RoBERTa or ViT checkpoint (a transformers folder) into a Luna model folder: the command
line of `luna_hf.convert_to_luna`, whose docstring (src/luna_hf/conversion.py) says what is copied and what is new.

    python scripts/convert_to_luna.py --model_name_or_path all-MiniLM-L6-v2 --output_dir minilm-luna \
        --attention learned_kernel

Then `scripts/transfer_attention.py` (`luna_hf.transfer_attention`) trains the new attention to imitate the
original's. `--max_position_embeddings` extends the positions for longer inputs by copying the learned ones
(Longformer's recipe). Nothing is written to `--output_dir` unless the whole conversion succeeded and the saved folder
reloads to the converted tensors. See docs/conversion.md.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

from luna_hf.conversion import (
    AUTO_CLASS_NAMES,
    VISION_FAMILIES,
    ConversionError,
    convert_to_luna,
    is_new_attention_parameter,
    load_processor,
    read_source_config,
    save_folder,
)
from luna_hf.model_card import write_model_card


@dataclass
class Arguments:
    model_name_or_path: str = field(metadata={"help": "A local transformers folder of a BERT or RoBERTa model."})
    output_dir: str = field(metadata={"help": "The Luna folder to write (must not exist)."})
    attention: Literal["nested", "learned_kernel"] = field(
        default="learned_kernel", metadata={"help": "Luna's nested attention, or the learned-kernel linear attention."}
    )
    projected_length: int = field(default=16, metadata={"help": "l, the length of P (nested attention only)."})
    kernel_num_projections: int = field(
        default=16,
        metadata={
            "help": "m, the learned projections of the feature map (learned_kernel only): more fit softmax attention "
            "more closely after transfer (docs/conversion.md) at the cost of more features per token."
        },
    )
    kernel_feature_map: Literal["learned", "elu_plus_one"] = field(
        default="learned",
        metadata={"help": "learned_kernel only: the learned feature map, or the fixed elu + 1 (a baseline)."},
    )
    max_position_embeddings: int | None = field(
        default=None,
        metadata={
            "help": "Extend the position table to this many rows (the config's max_position_embeddings: 4096 for a "
            "BERT reading 4096 tokens, 4098 for a RoBERTa) by repeating the learned positions."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    seed: int = field(default=0, metadata={"help": "Seed of the new parameters' initialisation (the feature maps)."})


def write_card(folder: Path, model, args: Arguments, architecture: str, auto_class: str) -> None:
    config = model.config
    attention = {
        "learned_kernel": "the learned-kernel linear attention (Shahbazi et al., 2025); its feature maps are new",
        "nested": f"Luna's nested attention (Ma et al., 2021), l = {config.projected_length}; the pack attention, "
        "P and the unpack keys/values are new, initialised from the original's projections",
    }[args.attention]
    write_model_card(
        folder, config=config, script="scripts/convert_to_luna.py", model_id=Path(args.output_dir).name,
        load_class=auto_class,
        title=f"{Path(args.output_dir).name}: {Path(args.model_name_or_path).name} converted to Luna",
        summary=f"`{architecture}` from `{args.model_name_or_path}` converted into `{type(model).__name__}` with "
                f"{attention}. Embeddings, LayerNorms, feed-forward blocks, attention projections and the head are "
                "the original's, unchanged.",
        data="What the original was trained on. The conversion reads no data.",
        metrics={},
        no_metrics_reason="a conversion measures no task metric. Before attention transfer "
                          "(scripts/transfer_attention.py) and fine-tuning the new attention does not compute the "
                          "original's, so the outputs differ from the original's (docs/conversion.md).",
        limitations=[
            "Not a drop-in replacement before scripts/transfer_attention.py and fine-tuning.",
            "The weights are the original's: its license and terms apply, whatever the license field says.",
            inputs_limit(config, args),
        ],
    )  # fmt: skip


def inputs_limit(config, args: Arguments) -> str:
    if config.image_size:
        side = config.image_size
        return (f"Images of {side}x{side} pixels; other sizes (whole {config.patch_size}-pixel patches) with "
                "`interpolate_pos_encoding=True`.")  # fmt: skip
    return f"Inputs of at most {config.max_sequence_length} tokens" + (
        " (positions beyond the original's repeat its learned ones)." if args.max_position_embeddings else ".")


def convert(args: Arguments) -> Path:
    source_dir, output_dir = Path(args.model_name_or_path), Path(args.output_dir)
    if output_dir.exists() and not args.overwrite_output_dir:
        raise ConversionError(f"--output_dir {output_dir} exists; pass --overwrite_output_dir to replace it.")

    # Phase 1: check the source, read its tokenizer (or image processor), convert.
    source_config, architecture = read_source_config(source_dir)
    processor = load_processor(source_dir, source_config)
    tokenizer = None if source_config.model_type in VISION_FAMILIES else processor
    model = convert_to_luna(source_dir, attention=args.attention, projected_length=args.projected_length,
                            kernel_num_projections=args.kernel_num_projections,
                            max_position_embeddings=args.max_position_embeddings, tokenizer=tokenizer, seed=args.seed,
                            kernel_feature_map=args.kernel_feature_map)

    # Phase 2: save through a staging folder, checked to reload, renamed into place.
    auto_class = AUTO_CLASS_NAMES[type(model).__name__]
    save_folder(model, processor, output_dir, overwrite=args.overwrite_output_dir,
                write_readme=lambda folder: write_card(folder, model, args, architecture, auto_class))  # fmt: skip
    new_parameters = sum(parameter.numel() for name, parameter in model.named_parameters()
                         if is_new_attention_parameter(name, args.attention))  # fmt: skip
    side = model.config.image_size
    print(
        f"Converted {architecture} {source_dir} -> {output_dir}: {type(model).__name__}, attention {args.attention}, "
        f"{model.num_parameters() / 1e6:.2f}M parameters ({new_parameters / 1e6:.3f}M new), "
        + (f"images of {side}x{side}" if side else f"{model.config.max_sequence_length} positions")
    )
    return output_dir


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(args=argv)
    try:
        convert(args)
    except ConversionError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
