"""How an LRA task is written (imported by scripts/lra/build_data.py and scripts/lra/pathfinder.py, run by neither):
one parquet file per split and `info.json`, assembled under a temporary name beside the destination and renamed into
place when complete."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from datasets import Dataset


def write_task(splits: dict, info: dict, args) -> Path:
    """`args`: the builder's arguments (output_dir, overwrite, task, seed)."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not args.overwrite:
        raise SystemExit(f"{output_dir} exists: pass --overwrite to replace it, or choose another --output_dir.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    info = {"task": args.task, **info, "num_rows": {split: len(columns["label"]) for split, columns in splits.items()},
            "seed": args.seed}
    for split, columns in splits.items():
        Dataset.from_dict(columns).to_parquet(str(partial / f"{split}.parquet"))
    (partial / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(partial, output_dir)
    return output_dir
