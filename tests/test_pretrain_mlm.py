"""End-to-end tests of scripts/pretrain_mlm.py on a tiny corpus written here: offline, CPU, tiny models.

Every run is a subprocess (`sys.executable scripts/pretrain_mlm.py ...`), as users run it.
"""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain_mlm.py"
TINY = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64,projected_length=8"
TINY_ROBERTA = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64"

NOUNS = "cat dog bird horse farmer teacher river city garden window letter engine".split()
VERBS = "sees finds likes follows paints builds opens reads carries watches".split()
ADJECTIVES = "small old green quiet bright heavy young strange".split()


def sentences(count: int, seed: int) -> list[str]:
    """Lines of a small grammar: enough structure for a tiny model to learn within a few dozen steps."""
    rng = random.Random(seed)
    return [
        " ".join(
            f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."
            for _ in range(3)
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    (root / "train.txt").write_text("\n".join(sentences(1500, seed=0)) + "\n")
    (root / "validation.txt").write_text("\n".join(sentences(300, seed=1)) + "\n")
    return root


def command(workdir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(SCRIPT), "--output_dir", str(output_dir),
        "--train_file", str(workdir / "train.txt"), "--validation_file", str(workdir / "validation.txt"),
        "--preset", "luna-small", "--config_overrides", TINY, "--max_seq_length", "32",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--max_eval_samples", "32",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "7", *extra,
    ]  # fmt: skip


def environment(workdir: Path) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(workdir: Path, output_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command(workdir, output_dir, *extra), env=environment(workdir), capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain_mlm.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def history(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> dict[int, float]:
    """Training loss per step; after a resume the later record of a step wins."""
    return {record["step"]: record["train_loss"] for record in history(output_dir) if "train_loss" in record}


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """A 40-step Luna run that trains its own tokenizer and saves a checkpoint every 10 steps."""
    output_dir = workdir / "uninterrupted"
    run(
        workdir, output_dir, "--train_tokenizer", "--vocab_size", "400", "--max_train_steps", "40",
        "--checkpointing_steps", "10",
    )  # fmt: skip
    return output_dir


def test_loss_falls_and_outputs_are_complete(uninterrupted):
    losses = train_losses(uninterrupted)
    assert sorted(losses) == list(range(1, 41))
    results = json.loads((uninterrupted / "all_results.json").read_text())
    assert results["step"] == 40
    # From about ln(400) = 6 for the untrained model to well below it.
    assert losses[1] > 5.0
    assert results["eval_loss"] < losses[1] - 2.0, (losses[1], results)
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert 0.1 < results["eval_accuracy"] <= 1.0  # chance: 1/400
    assert [path.name for path in sorted((uninterrupted / "checkpoints").iterdir())] == [
        "step_10", "step_20", "step_30", "step_40"
    ]  # fmt: skip
    config = json.loads((uninterrupted / "config.json").read_text())
    vocabulary = json.loads((uninterrupted / "tokenizer.json").read_text())["model"]["vocab"]
    assert config["model_type"] == "luna" and config["vocab_size"] == len(vocabulary) <= 400
    assert [vocabulary[token] for token in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (1, 0, 2)
    assert config["max_position_embeddings"] == 32 + 2
    # The script trains with sparse prediction (its default for Luna) but publishes a plain masked LM.
    assert config["sparse_prediction"] is False
    card = ModelCard.load(uninterrupted / "README.md")  # written locally; --push_to_hub uploads the folder as is
    assert f"| eval_loss | {results['eval_loss']:.4f} |" in card.text and "train.txt" in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["eval_accuracy"] == results["eval_accuracy"]
    assert card.data.pipeline_tag == "fill-mask" and "AutoModelForMaskedLM" in card.text
    assert (uninterrupted / "modeling_luna.py").is_file() and (uninterrupted / "tokenizer.json").is_file()


def test_roberta_trains_through_the_same_pipeline(workdir, uninterrupted):
    output_dir = workdir / "roberta"
    run(
        workdir, output_dir, "--model_type", "roberta", "--config_overrides", TINY_ROBERTA,
        "--tokenizer_name", str(uninterrupted), "--max_train_steps", "40",
    )  # fmt: skip
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "roberta" and config["hidden_size"] == 32 and config["type_vocab_size"] == 1
    losses = train_losses(output_dir)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_loss"] < losses[1] - 2.0, (losses[1], results)


def test_sigkill_then_resume_gives_the_uninterrupted_losses(workdir, uninterrupted):
    output_dir = workdir / "killed"
    process = subprocess.Popen(
        command(
            workdir, output_dir, "--train_tokenizer", "--vocab_size", "400", "--max_train_steps", "40",
            "--checkpointing_steps", "10",
        ),
        env=environment(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (output_dir / "checkpoints" / "step_10").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / "all_results.json").exists(), "the run finished before it could be killed"
    killed_at = max(train_losses(output_dir))

    run(
        workdir, output_dir, "--train_tokenizer", "--vocab_size", "400", "--max_train_steps", "40",
        "--checkpointing_steps", "10", "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    resumed, reference = train_losses(output_dir), train_losses(uninterrupted)
    assert killed_at >= 10 and sorted(resumed) == list(range(1, 41))
    assert [resumed[step] for step in range(11, 41)] == pytest.approx(
        [reference[step] for step in range(11, 41)], rel=1e-6, abs=1e-6
    )
    final = json.loads((output_dir / "all_results.json").read_text())
    assert final["eval_loss"] == pytest.approx(
        json.loads((uninterrupted / "all_results.json").read_text())["eval_loss"], rel=1e-6
    )


def test_corrupt_checkpoint_is_named_and_the_previous_one_resumes(workdir, uninterrupted):
    output_dir = workdir / "corrupt"
    shutil.copytree(uninterrupted, output_dir)
    (output_dir / "log_history.jsonl").unlink()
    weights = output_dir / "checkpoints" / "step_40" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (output_dir / "checkpoints" / ".tmp-step_50").mkdir()  # what a save killed half-way leaves: never "latest"

    failed = run(
        workdir, output_dir, "--tokenizer_name", str(output_dir), "--max_train_steps", "40",
        "--resume_from_checkpoint", "latest", check=False,
    )  # fmt: skip
    assert failed.returncode != 0
    assert f"Checkpoint {output_dir / 'checkpoints' / 'step_40'} is corrupt or incomplete" in failed.stderr
    assert f"previous checkpoint is {output_dir / 'checkpoints' / 'step_30'}" in failed.stderr

    run(
        workdir, output_dir, "--tokenizer_name", str(output_dir), "--max_train_steps", "40",
        "--checkpointing_steps", "10", "--resume_from_checkpoint", str(output_dir / "checkpoints" / "step_30"),
    )  # fmt: skip
    resumed, reference = train_losses(output_dir), train_losses(uninterrupted)
    assert sorted(resumed) == list(range(31, 41))
    assert [resumed[step] for step in resumed] == pytest.approx([reference[step] for step in resumed], rel=1e-6)


def test_long_blocks_of_4096_tokens(workdir, uninterrupted):
    output_dir = workdir / "long"
    run(
        workdir, output_dir, "--tokenizer_name", str(uninterrupted), "--max_seq_length", "4096",
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--max_eval_samples", "1",
        "--max_train_steps", "2", "--gradient_checkpointing",
    )  # fmt: skip
    records = history(output_dir)
    assert [record["tokens_seen"] for record in records if "train_loss" in record] == [4096, 8192]
    assert all(math.isfinite(record.get("train_loss", record.get("eval_loss"))) for record in records)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 4096 + 2


def test_tensorboard_receives_the_training_logs(workdir, uninterrupted):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = workdir / "tensorboard"
    run(
        workdir, output_dir, "--tokenizer_name", str(uninterrupted), "--max_train_steps", "4", "--logging_steps", "2",
        "--eval_steps", "2", "--report_to", "tensorboard",
    )  # fmt: skip
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    assert {"train_loss", "learning_rate", "tokens_per_second", "eval_loss", "eval_accuracy"} <= set(
        events.Tags()["scalars"]
    )
    assert [event.step for event in events.Scalars("train_loss")] == [2, 4]
    assert [event.step for event in events.Scalars("eval_loss")] == [2, 4]


def test_two_processes_with_the_shipped_ddp_config(workdir, uninterrupted):
    """`accelerate launch` with scripts/accelerate_configs/multi_gpu.yaml on this GPU-less machine: one 2-process
    gloo job, without any environment variable."""
    output_dir = workdir / "ddp"
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "scripts" / "accelerate_configs" / "multi_gpu.yaml"),
        "--num_processes", "2", "--mixed_precision", "no",
    ]  # fmt: skip
    arguments = command(
        workdir, output_dir, "--tokenizer_name", str(uninterrupted), "--max_train_steps", "6",
        "--checkpointing_steps", "3", "--logging_steps", "3",
    )[1:]  # fmt: skip
    result = subprocess.run(
        launcher + arguments,
        env=environment(workdir),  # no ACCELERATE_USE_CPU: the script forms the gloo job itself
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Num processes: 2" in result.stderr
    # Each optimizer step sees 2 processes x 4 blocks x 32 tokens; each process saved its own RNG state.
    assert [record["tokens_seen"] for record in history(output_dir) if "train_loss" in record] == [768, 1536]
    assert sorted(path.name for path in (output_dir / "checkpoints" / "step_6").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"
    ]  # fmt: skip
    assert json.loads((output_dir / "all_results.json").read_text())["step"] == 6


LOAD_WITHOUT_LUNA_HF = """
import sys

class BlockLunaHf:
    def find_spec(self, name, path=None, target=None):
        if name == "luna_hf" or name.startswith("luna_hf."):
            raise ImportError("luna_hf is blocked in this process")

sys.meta_path.insert(0, BlockLunaHf())
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

folder = sys.argv[1]
model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
# AutoTokenizer reads the model's config first: with trust_remote_code=True it does not stop to ask.
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
assert type(tokenizer).__name__ == "RobertaTokenizer", type(tokenizer)
fill = pipeline("fill-mask", model=folder, trust_remote_code=True)
predictions = fill("The old dog <mask> the river.")
assert len(predictions) == 5 and all(0.0 <= p["score"] <= 1.0 for p in predictions)
try:
    import luna_hf  # noqa: F401
except ImportError:
    print("OK", type(model).__name__, predictions[0]["token_str"])
"""


def test_output_loads_with_auto_class_and_pipeline_without_luna_hf(workdir, uninterrupted):
    env = {key: value for key, value in environment(workdir).items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_LUNA_HF, str(uninterrupted)],
        cwd="/tmp", env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("OK LunaForMaskedLM")
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr


def test_published_folder_gives_every_positions_logits_to_run_mlm_style_metrics(uninterrupted):
    """transformers' run_mlm.py evaluates with argmax over the logits and labels flattened alike; the sparse head's
    (masked tokens, vocab) logits made it fail with an IndexError."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(uninterrupted, trust_remote_code=True)
    model = AutoModelForMaskedLM.from_pretrained(uninterrupted, trust_remote_code=True).eval()
    torch.manual_seed(0)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    batch = collator([tokenizer(text) for text in sentences(4, seed=5)])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    labels, predictions = batch["labels"].reshape(-1), logits.argmax(dim=-1).reshape(-1)
    scored = labels != -100
    accuracy = (predictions[scored] == labels[scored]).float().mean().item()  # run_mlm.py's compute_metrics
    assert scored.any() and 0.0 <= accuracy <= 1.0


def script_module():
    """scripts/pretrain_mlm.py imported as a module."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import pretrain_mlm
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return pretrain_mlm


@pytest.mark.parametrize("model_type, sparse", [("luna", True), ("luna", False), ("roberta", None)])
def test_sparse_prediction_is_set_for_luna_only(workdir, uninterrupted, model_type, sparse):
    from transformers import AutoTokenizer

    script = script_module()
    args = script.Arguments(
        output_dir=str(workdir / "unused"), train_file=str(workdir / "train.txt"), model_type=model_type,
        config_overrides=TINY if model_type == "luna" else TINY_ROBERTA, max_seq_length=32,
        tokenizer_name=str(uninterrupted), **({} if sparse is None else {"sparse_prediction": sparse}),
    )  # fmt: skip
    model = script.build_model(args, AutoTokenizer.from_pretrained(uninterrupted))
    assert getattr(model.config, "sparse_prediction", None) is sparse


@pytest.mark.parametrize("normalize_before, expected", [(None, True), (True, True), (False, False)])
def test_luna_from_a_preset_is_pre_layer_norm_unless_told_otherwise(workdir, uninterrupted, normalize_before, expected):
    from transformers import AutoTokenizer

    script = script_module()
    options = {} if normalize_before is None else {"normalize_before": normalize_before}
    args = script.Arguments(
        output_dir=str(workdir / "unused"), train_file=str(workdir / "train.txt"), preset="luna-small",
        config_overrides=TINY, max_seq_length=32, tokenizer_name=str(uninterrupted), **options,
    )  # fmt: skip
    model = script.build_model(args, AutoTokenizer.from_pretrained(uninterrupted))
    assert model.config.normalize_before is expected
    assert hasattr(model.luna, "layer_norm") is expected  # the pre-LN model's final LayerNorms
    # A --config_name keeps its own layers unless the flag is given.
    model.config.save_pretrained(workdir / "config-folder")
    args.preset, args.config_name, args.normalize_before = None, str(workdir / "config-folder"), None
    assert script.build_model(args, AutoTokenizer.from_pretrained(uninterrupted)).config.normalize_before is expected


@pytest.mark.parametrize(
    "train_file, extra, message",
    [
        ("corpus.xyz", {"train_tokenizer": True}, "data files must end in one of"),
        ("missing.txt", {"train_tokenizer": True}, "missing.txt: no such file"),
        ("train.txt", {}, "Pass --tokenizer_name, --model_name_or_path, or --train_tokenizer"),
        ("train.txt", {"train_tokenizer": True, "streaming": True}, "with --streaming pass --tokenizer_name"),
        ("train.txt", {"train_tokenizer": True, "model_type": "roberta", "normalize_before": True}, "from scratch"),
        ("train.txt", {"model_name_or_path": "x", "normalize_before": False}, "keep their own"),
    ],
)
def test_bad_arguments_give_clear_errors(workdir, train_file, extra, message):
    (workdir / "corpus.xyz").write_text("text\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        script_module().Arguments(output_dir=str(workdir / "unused"), train_file=str(workdir / train_file), **extra)


def test_out_of_memory_says_what_fits(workdir, uninterrupted, monkeypatch, capsys):
    """An allocation that fails in a training step (as torch's CPU allocator reports it) ends with what to do."""
    pretrain_mlm = script_module()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 805306368 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(pretrain_mlm, "train", out_of_memory)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pretrain_mlm.py",
            *command(workdir, workdir / "oom", "--tokenizer_name", str(uninterrupted), "--max_train_steps", "2")[2:],
        ],
    )
    for key, value in environment(workdir).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        pretrain_mlm.main()
    message = str(stopped.value)
    assert message.startswith("Out of memory in a training step of 4 x 32 tokens per process.")
    assert "--gradient_checkpointing" in message and "--max_length_search" in message
    assert message.endswith("The last complete checkpoint is none.")


def collapse(model) -> None:
    """Make a Luna collapse as a post-LN Luna trained at too high a learning rate does: the unpack attention's output
    (here its bias) dwarfs the residual, so after the layer's LayerNorm every token state is the same vector."""
    with torch.no_grad():
        for layer in model.luna.layers:
            layer.unpack_attention.o_proj.bias.normal_(generator=torch.Generator().manual_seed(0)).mul_(1e4)


@pytest.mark.parametrize("collapsed", [False, True])
def test_evaluation_measures_the_token_state_spread_and_warns_of_a_collapse(collapsed, caplog):
    from accelerate import Accelerator

    from luna_hf import LunaConfig, LunaForMaskedLM

    pretrain_mlm = script_module()
    torch.manual_seed(0)
    config = LunaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, projected_length=8, max_position_embeddings=34)  # fmt: skip
    model = LunaForMaskedLM(config)
    if collapsed:
        collapse(model)
    input_ids = torch.randint(5, 60, (6, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.where(torch.rand(6, 32, generator=torch.Generator().manual_seed(2)) < 0.15, input_ids, -100)
    batches = [{"input_ids": input_ids[i : i + 3], "labels": labels[i : i + 3]} for i in (0, 3)]
    with caplog.at_level("WARNING"):
        metrics = pretrain_mlm.evaluate(model, batches, Accelerator(cpu=True))
    assert model.training  # evaluate hands the model back in training mode
    # The same measure computed directly on the final states of the 192 tokens.
    with torch.no_grad():
        states = model.eval().luna(input_ids).last_hidden_state.reshape(-1, 32).double()
    expected = ((states - states.mean(0)).pow(2).sum(-1).mean() / states.pow(2).sum(-1).mean()).sqrt().item()
    assert metrics["token_state_spread"] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    warned = "The model has collapsed" in caplog.text
    if collapsed:
        assert metrics["token_state_spread"] < 1e-3 and warned
    else:
        assert metrics["token_state_spread"] > 0.5 and not warned


def test_collapse_check_reports_spread_and_norms(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import collapse_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from luna_hf import LunaConfig, LunaForMaskedLM

    vocabulary = {word: i for i, word in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + NOUNS + VERBS + ADJECTIVES)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LunaConfig(vocab_size=len(vocabulary), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, projected_length=8, max_position_embeddings=66)  # fmt: skip
    model = LunaForMaskedLM(config)
    texts = [" ".join(text.replace(".", "").split()[1:]) for text in sentences(16, seed=3)]  # various first words
    healthy = collapse_check.collapse_report(model, tokenizer, texts, max_length=64)
    collapse(model)
    collapsed = collapse_check.collapse_report(model, tokenizer, texts, max_length=64)
    assert healthy["token_spread"] > 0.5 and healthy["mean_cosine"] < 0.5 and not healthy["collapsed"]
    assert collapsed["token_spread"] < 1e-3 and collapsed["mean_cosine"] > 0.999 and collapsed["collapsed"]
    assert collapsed["sentence_spread"] < 1e-3 < healthy["sentence_spread"]
    assert len(collapsed["attention_output_norm"]) == len(collapsed["residual_norm"]) == 2
    # The collapse shows where it comes from: the unpack output dwarfs the residual it is added to.
    assert min(collapsed["attention_output_norm"]) > 100 * max(collapsed["residual_norm"])
    assert max(healthy["attention_output_norm"]) < max(healthy["residual_norm"])
