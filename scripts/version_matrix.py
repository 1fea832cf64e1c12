#!/usr/bin/env python
"""luna-hf on the transformers releases it supports, each in its own virtual environment:

    python scripts/version_matrix.py                       # .ci/run runs it after the main suite
    python scripts/version_matrix.py --releases 5.9.0      # one release

The main suite runs on the newest release (the one `pip install -e .` resolves). For each of `--releases` this makes
(or reuses) `--venv_dir/transformers-X` with `torch==2.13.0`, that release and pytest, and there

1. for 5.x: runs the model test files (`tests/test_modeling_luna*.py`, `tests/test_learned_kernel.py`) against
   luna_hf from `src/` (PYTHONPATH; nothing of luna_hf is installed in the environment);
2. for every release: the remote-code round trip. Folders saved here with the newest release (every encoder head,
   nested and learned kernel, the image classifier; the causal LM, both attentions; the translation model) are
   loaded there through `trust_remote_code=True` alone and must give the logits saved with them (|difference| <=
   1e-5) and the same greedy and beam-search tokens. On 4.57 the encoder heads must, and the causal and translation
   folders must stop with one error naming the release they need;
3. with `--gpu_dry_run` (CI: on 5.17.0, with huggingface_hub 1.33: the GPU machine's versions): runs
   `scripts/gpu_run.py --dry_run` there, the GPU command at tiny sizes on the CPU.

Environments install from pip's cache after the first run. Prints one line per check and a table; exits 1 if any
check failed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RELEASES = ["4.57.6", "5.9.0", "5.17.0"]
# What else each release's environment pins: the GPU image's huggingface_hub for 5.17 (the dry run's versions).
EXTRA_REQUIREMENTS = {"5.17.0": ["huggingface_hub==1.33.0"]}
MODEL_TEST_FILES = [
    "tests/test_modeling_luna.py",
    "tests/test_learned_kernel.py",
    "tests/test_modeling_luna_causal.py",
    "tests/test_modeling_luna_seq2seq.py",
]
ENCODER_KINDS = {  # folder -> (Auto class, LunaConfig overrides)
    "masked-lm": ("AutoModelForMaskedLM", {}),
    "masked-lm-learned-kernel": ("AutoModelForMaskedLM", {"attention_type": "learned_kernel"}),
    "sequence-classification": ("AutoModelForSequenceClassification", {"classifier_pooling": "packed_attention"}),
    "sequence-classification-learned-kernel": (
        "AutoModelForSequenceClassification",
        {"attention_type": "learned_kernel", "classifier_pooling": "mean"},
    ),
    "token-classification": ("AutoModelForTokenClassification", {"num_labels": 3}),
    "multiple-choice": ("AutoModelForMultipleChoice", {}),
    "question-answering": ("AutoModelForQuestionAnswering", {"attention_type": "learned_kernel"}),
    "image-classification": ("AutoModelForImageClassification", {"image_size": 8, "patch_size": 4,
                                                                 "normalize_before": True}),
}
GENERATING_KINDS = {
    "causal-lm": ("AutoModelForCausalLM", {"is_decoder": True}),
    "causal-lm-learned-kernel": ("AutoModelForCausalLM", {"is_decoder": True, "attention_type": "learned_kernel"}),
    "translation": ("AutoModelForSeq2SeqLM", None),
}
TOLERANCE = 1e-5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", nargs="+", default=DEFAULT_RELEASES, help="transformers releases to check.")
    parser.add_argument("--venv_dir", default=str(Path.home() / ".cache" / "luna-hf-matrix"),
                        help="Where the environments live (reused while they hold the same requirements).")
    parser.add_argument("--skip_tests", action="store_true", help="Only the round trip (and the dry run).")
    parser.add_argument("--gpu_dry_run", default="5.17.0", help="Release whose environment dry-runs gpu_run.py "
                        "('none': skip).")  # fmt: skip
    parser.add_argument("--load_folders", help=argparse.SUPPRESS)  # the round trip's second half, run in a venv
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------------------
# The round trip: folders saved here, loaded in each environment


def save_reference_folders(directory: Path) -> None:
    """Tiny models of every kind, saved with their code, and `reference.pt`: inputs and this release's outputs."""
    import torch

    from luna_hf import LunaConfig, LunaForConditionalGeneration, LunaSeq2SeqConfig
    from luna_hf import __dict__ as luna_classes

    shape = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 projected_length=4, max_position_embeddings=66, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)  # fmt: skip
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for kind, (auto_class, overrides) in {**ENCODER_KINDS, **GENERATING_KINDS}.items():
        torch.manual_seed(0)
        if overrides is None:
            config = LunaSeq2SeqConfig(vocab_size=60, hidden_size=32, encoder_layers=2, decoder_layers=2,
                                       num_attention_heads=4, intermediate_size=48, projected_length=4,
                                       max_position_embeddings=64, hidden_dropout_prob=0.0)  # fmt: skip
            model = LunaForConditionalGeneration(config)
        else:
            config = LunaConfig(**{**shape, **overrides})
            model = luna_classes[auto_class.replace("AutoModel", "Luna")](config)
        model.eval().save_pretrained(directory / kind)
        inputs = dict(input_ids=ids, attention_mask=mask)
        if auto_class == "AutoModelForMultipleChoice":
            inputs = {name: tensor[:, None].expand(-1, 3, -1) for name, tensor in inputs.items()}
        if auto_class == "AutoModelForImageClassification":
            inputs = dict(pixel_values=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
        reference = dict(auto_class=auto_class, inputs=inputs)
        with torch.no_grad():
            decoder = dict(decoder_input_ids=ids[:, :4]) if overrides is None else {}
            reference["logits"] = first_logits(model(**inputs, **decoder))
            if kind in GENERATING_KINDS:  # the second row left-padded, as generate() wants a decoder-only batch
                prompt_ids, prompt_mask = ids[:, :6].clone(), torch.ones(2, 6, dtype=torch.long)
                prompt_ids[1, :2], prompt_mask[1, :2] = config.pad_token_id, 0
                prompt = dict(input_ids=prompt_ids, attention_mask=prompt_mask)
                reference["prompt"] = prompt
                reference["greedy"] = model.generate(**prompt, max_new_tokens=5, do_sample=False)
                reference["beam"] = model.generate(**prompt, max_new_tokens=5, do_sample=False, num_beams=3)
        torch.save(reference, directory / kind / "reference.pt")


def first_logits(outputs):
    return outputs.logits if hasattr(outputs, "logits") else outputs.start_logits


def load_and_compare(directory: Path) -> list[dict]:
    """Run inside an environment without luna_hf: load every folder through remote code, compare with the saved
    outputs. A generating folder on a release without the generation interface must refuse in one clear error."""
    import torch
    import transformers

    results = []
    for folder in sorted(path for path in directory.iterdir() if (path / "reference.pt").is_file()):
        reference = torch.load(folder / "reference.pt")
        result = dict(folder=folder.name, transformers=transformers.__version__)
        try:
            model = getattr(transformers, reference["auto_class"]).from_pretrained(folder, trust_remote_code=True)
            model.eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                decoder = {"decoder_input_ids": reference["inputs"]["input_ids"][:, :4]} if "Seq2Seq" in reference[
                    "auto_class"] else {}  # fmt: skip
                difference = (first_logits(model(**reference["inputs"], **decoder)) - reference["logits"]).abs().max()
                result["logits_difference"] = float(difference)
                ok = result["logits_difference"] <= TOLERANCE
                if "greedy" in reference:
                    greedy = model.generate(**reference["prompt"], max_new_tokens=5, do_sample=False)
                    beam = model.generate(**reference["prompt"], max_new_tokens=5, do_sample=False, num_beams=3)
                    result["same_tokens"] = torch.equal(greedy, reference["greedy"]) and torch.equal(
                        beam, reference["beam"]
                    )
                    ok = ok and result["same_tokens"]
            result["status"] = "ok" if ok else "different outputs"
        except ImportError as error:  # the one error a release without the generation interface must give
            result["status"], result["error"] = "refused", str(error).splitlines()[0]
        except Exception as error:  # noqa: BLE001 (reported, and fails the matrix)
            result["status"], result["error"] = "failed", f"{type(error).__name__}: {str(error)[:300]}"
        results.append(result)
    return results


def judge_round_trip(release: str, results: list[dict]) -> list[str]:
    """Problems: on 5.x every folder must match; on 4.x the encoders must, the generating ones refuse clearly."""
    problems = []
    for result in results:
        generating = result["folder"] in GENERATING_KINDS
        if release.startswith("4.") and generating:
            if result["status"] != "refused" or "needs transformers >=" not in result.get("error", ""):
                problems.append(f"{result['folder']}: expected a clear refusal on {release}, got {result}")
        elif result["status"] != "ok":
            problems.append(f"{result['folder']}: {result}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Environments


def environment(venv_dir: Path, release: str) -> Path:
    """The environment's python, made (or reused when it already holds `release`) with torch 2.13.0 and pytest."""
    venv = venv_dir / f"transformers-{release}"
    python = venv / "bin" / "python"
    marker = venv / "luna-matrix.json"
    requirements = ["torch==2.13.0", f"transformers=={release}", "accelerate", "pytest", "parameterized",
                    "tokenizers", "safetensors", *EXTRA_REQUIREMENTS.get(release, [])]  # fmt: skip
    if marker.is_file() and json.loads(marker.read_text()) == requirements and python.is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], capture_output=True,
                             text=True, timeout=900)  # fmt: skip
    if install.returncode != 0:
        sys.exit(f"Could not make the transformers {release} environment ({venv}):\n{install.stderr[-3000:]}")
    marker.write_text(json.dumps(requirements))
    return python


def clean_env(**extra) -> dict:
    """The environment variables of a child that must not see this checkout's luna_hf (nor the user's caches)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_HOME", "HF_MODULES_CACHE")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", **extra}


def run_checks(python: Path, release: str, args, folders: Path, home: Path) -> list[tuple[str, str, str]]:
    """(release, check, outcome) for the release's checks, in order; each printed as it ends."""
    rows = []

    def record(check: str, outcome: str, started: float) -> None:
        rows.append((release, check, outcome))
        print(f"[{release}] {check}: {outcome} ({time.time() - started:.0f} s)", flush=True)

    if release.startswith("5.") and not args.skip_tests:
        started = time.time()
        tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODEL_TEST_FILES],
                               cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT / "src"), HF_HOME=str(home)),
                               capture_output=True, text=True, timeout=1200)  # fmt: skip
        summary = (tests.stdout.strip().splitlines() or ["no output"])[-1]
        if tests.returncode != 0:
            print(tests.stdout[-6000:] + tests.stderr[-3000:])
        record("model tests", ("ok: " if tests.returncode == 0 else "FAILED: ") + summary, started)
    started = time.time()
    loaded = subprocess.run([str(python), str(Path(__file__).resolve()), "--load_folders", str(folders)],
                            cwd=home, env=clean_env(HF_HOME=str(home)), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    if loaded.returncode != 0:
        record("remote-code round trip", "FAILED: " + loaded.stderr[-2000:], started)
    else:
        results = json.loads(loaded.stdout.strip().splitlines()[-1])
        problems = judge_round_trip(release, results)
        summary = ", ".join(f"{r['folder']} {r['status']}" for r in results)
        record("remote-code round trip", ("FAILED: " + "; ".join(problems)) if problems else "ok: " + summary, started)
    if release == args.gpu_dry_run:
        started = time.time()
        with tempfile.TemporaryDirectory() as results_dir:
            dry = subprocess.run([str(python), "scripts/gpu_run.py", "--dry_run", "--results_dir", results_dir],
                                 cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT / "src"), HF_HOME=str(home)),
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
            written = sorted(path.name for path in Path(results_dir).iterdir())
        if dry.returncode != 0:
            print(dry.stdout[-6000:] + dry.stderr[-3000:])
        record("GPU command, dry run on CPU", (f"ok: wrote {', '.join(written)}" if dry.returncode == 0 else
                                               f"FAILED (exit {dry.returncode})"), started)  # fmt: skip
    return rows


def main():
    args = parse_args()
    if args.load_folders:  # inside an environment: no luna_hf, only torch and the release's transformers
        print(json.dumps(load_and_compare(Path(args.load_folders))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folders = Path(scratch) / "folders"
        save_reference_folders(folders)
        for release in args.releases:
            started = time.time()
            python = environment(Path(args.venv_dir), release)
            print(f"[{release}] environment ready ({time.time() - started:.0f} s)", flush=True)
            home = Path(scratch) / f"home-{release}"  # a module cache of its own: nothing copied by another release
            home.mkdir()
            rows += run_checks(python, release, args, folders, home)
    print("\n| transformers | check | outcome |\n|---|---|---|")
    for release, check, outcome in rows:
        print(f"| {release} | {check} | {outcome[:160]} |")
    failed = [row for row in rows if not row[2].startswith("ok")]
    if failed:
        sys.exit(f"\n{len(failed)} check(s) failed.")


if __name__ == "__main__":
    main()
