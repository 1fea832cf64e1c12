#!/usr/bin/env python
"""Generate Long Range Arena's ListOps task with the rules and flags of LRA's own generator
(google-research/long-range-arena, `lra_benchmarks/data/listops.py`), seeded, into LRA's own files.

    python scripts/lra/listops.py --output_dir data/lra/listops            # 96,000 / 2,000 / 2,000 examples

A sequence is a tree of operators over the digits 0-9: `[MIN`, `[MAX`, `[MED` (median, then `int()`), `[SM` (sum
mod 10). Below `--max_depth` a node is an operator with probability 0.25 (a digit otherwise); an operator takes 2 to
`--max_args` arguments and is closed by `]`. A tree is kept when its length (operators + digits + `]`) lies strictly
between `--min_length` and `--max_length`, and only once. It is written with LRA's parentheses, e.g.
`( ( ( [MAX 2 ) 9 ) ] )` = 9, into `basic_{train,val,test}.tsv` (tab-separated, header `Source	Target`), which
LRA's loaders and `scripts/lra/run_lra.py` read. The same `--seed` writes the same bytes. Each file is written
under a temporary name and renamed when complete, so an interrupted run leaves no file that looks finished.
"""

import csv
import os
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
OPERATOR_PROBABILITY = 0.25


@dataclass
class ListOpsArguments:
    output_dir: str = field(default="data/lra/listops", metadata={"help": "Where basic_{train,val,test}.tsv go."})
    task: str = field(default="basic", metadata={"help": "File name prefix, as in LRA."})
    num_train_samples: int = 96000
    num_valid_samples: int = 2000
    num_test_samples: int = 2000
    max_depth: int = field(default=10, metadata={"help": "Maximum tree depth."})
    max_args: int = field(default=10, metadata={"help": "Maximum number of arguments per operator."})
    max_length: int = field(default=2000, metadata={"help": "Kept sequences are strictly shorter than this."})
    min_length: int = field(default=500, metadata={"help": "Kept sequences are strictly longer than this."})
    seed: int = 0

    def __post_init__(self):
        if min(self.num_train_samples, self.num_valid_samples, self.num_test_samples) < 0:
            raise ValueError("--num_{train,valid,test}_samples must be >= 0.")
        if self.max_depth < 1 or self.max_args < 2:
            raise ValueError("--max_depth must be >= 1 and --max_args >= 2 (an operator takes at least 2 arguments).")
        if self.min_length + 1 >= self.max_length:
            raise ValueError(f"No length lies strictly between --min_length {self.min_length} and --max_length "
                             f"{self.max_length}: widen the range.")


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """A random tree and its length. An operator node is the nested pair ((((op, a1), a2), ...), END), as in LRA,
    so that printing every pair in parentheses gives LRA's text."""
    if depth >= max_depth or rng.random() > OPERATOR_PROBABILITY:
        return rng.choice(range(10)), 1
    arguments, length = [], 2  # the operator and its closing bracket
    for _ in range(rng.randint(2, max_args)):
        argument, argument_length = generate_tree(rng, depth + 1, max_depth, max_args)
        arguments.append(argument)
        length += argument_length
    node = (rng.choice(OPERATORS), arguments[0])
    for argument in arguments[1:]:
        node = (node, argument)
    return (node, END), length


def to_text(tree) -> str:
    if not isinstance(tree, tuple):
        return str(tree)
    return f"( {to_text(tree[0])} {to_text(tree[1])} )"


def evaluate(tree) -> int:
    """The value of a tree: unwind the nested pairs into an operator and its arguments, then apply it."""
    if not isinstance(tree, tuple):
        return tree
    node, arguments = tree[0], []
    while isinstance(node[0], tuple):
        arguments.append(evaluate(node[1]))
        node = node[0]
    operator, arguments = node[0], [evaluate(node[1])] + arguments[::-1]
    if operator == "[MIN":
        return min(arguments)
    if operator == "[MAX":
        return max(arguments)
    if operator == "[MED":
        return int(statistics.median(arguments))
    return sum(arguments) % 10


def generate(args: ListOpsArguments) -> list[tuple[str, int]]:
    """Distinct trees with a length in range, in the order drawn (a seeded, shuffled order)."""
    rng = random.Random(args.seed)
    total = args.num_train_samples + args.num_valid_samples + args.num_test_samples
    examples: dict[str, int] = {}
    with tqdm(total=total, desc="ListOps trees", unit="tree") as progress:
        while len(examples) < total:
            tree, length = generate_tree(rng, 1, args.max_depth, args.max_args)
            if args.min_length < length < args.max_length:
                text = to_text(tree)
                if text not in examples:
                    examples[text] = evaluate(tree)
                    progress.update(1)
    return list(examples.items())


def write_tsv(rows: list[tuple[str, int]], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["Source", "Target"])
        writer.writerows(rows)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ListOpsArguments).parse_args_into_dataclasses(args=argv)
    examples = generate(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": examples[: args.num_train_samples],
        "val": examples[args.num_train_samples : args.num_train_samples + args.num_valid_samples],
        "test": examples[args.num_train_samples + args.num_valid_samples :],
    }
    for split, rows in splits.items():
        write_tsv(rows, output_dir / f"{args.task}_{split}.tsv")
    print(f"ListOps: {', '.join(f'{len(rows)} {split}' for split, rows in splits.items())} examples "
          f"(lengths {args.min_length + 1}-{args.max_length - 1}, seed {args.seed}) in {output_dir}")


if __name__ == "__main__":
    main()
