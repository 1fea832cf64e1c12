"""scripts/convert_fairseq_luna_to_hf.py: fairseq-format Luna checkpoints built here at a tiny size (random weights,
the authors' tensor names) are converted, and the converted model is compared with an independent forward pass
computed from the fairseq state dict (tests/fairseq_reference.py)."""

import argparse
import collections
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from fairseq_reference import fairseq_luna_forward
from huggingface_hub import ModelCard
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForMaskedLM, AutoTokenizer

import luna_hf  # noqa: F401  (registers "luna" with the Auto classes)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_fairseq_luna_to_hf.py"
spec = importlib.util.spec_from_file_location("convert_fairseq_luna_to_hf", SCRIPT)
convert_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_script)

ENCODER = "encoder.sentence_encoder."
PAD = 1
TOLERANCE = 1e-5


def fairseq_args(**overrides) -> argparse.Namespace:
    """Training arguments as fairseq-apollo saves them for luna_bert (plus unrelated training options)."""
    values = dict(
        arch="luna_base_tied_512", task="masked_lm", criterion="masked_lm", optimizer="adam", lr=[6e-4],
        data="/data/bin", tokens_per_sample=16, seed=1, fp16=True,
        encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
        max_positions=16, projection_length=4, fix_projection_length=False, untie_luna_kv=False,
        activation_fn="gelu", pooler_activation_fn="tanh", dropout=0.1, attention_dropout=0.05,
        activation_dropout=0.0, pooler_dropout=0.2, encoder_layerdrop=0.0, encoder_layers_to_keep=None,
        untie_weights_luna=False, quant_noise_pq=0.0, quant_noise_pq_block_size=8,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def fairseq_state(args: argparse.Namespace, vocab_size: int = 40, heads: dict | None = None, seed: int = 0) -> dict:
    """Random luna_bert weights under the authors' names (LunaSentenceEncoder, LunaLMHead, classification heads)."""
    generator = torch.Generator().manual_seed(seed)
    width, ffn = args.encoder_embed_dim, args.encoder_ffn_embed_dim
    state = {}

    def randn(*shape, scale):
        return torch.randn(*shape, generator=generator) * scale

    def linear(name, out_features, in_features):
        state[name + ".weight"] = randn(out_features, in_features, scale=1.5 * in_features**-0.5)
        state[name + ".bias"] = randn(out_features, scale=0.1)

    def layer_norm(name):
        state[name + ".weight"] = 1 + randn(width, scale=0.2)
        state[name + ".bias"] = randn(width, scale=0.1)

    state[ENCODER + "embed_tokens.weight"] = randn(vocab_size, width, scale=0.3)  # also the LM output matrix
    state[ENCODER + "embed_tokens.weight"][PAD] = 0
    state[ENCODER + "embed_positions.weight"] = randn(args.max_positions + PAD + 1, width, scale=1.0)
    state[ENCODER + "embed_positions.weight"][PAD] = 0
    state[ENCODER + "projected_embeddings"] = randn(args.projection_length, width, scale=1.0)
    for i in range(args.encoder_layers):
        layer = f"{ENCODER}layers.{i}."
        kv = ["pk_proj", "pv_proj", "k_proj", "v_proj"] if args.untie_luna_kv else ["pc_proj", "c_proj"]
        for projection in ["pq_proj", "q_proj", *kv, "out_proj"]:
            linear(layer + "self_attn." + projection, width, width)
        layer_norm(layer + "self_attn_layer_norm")
        layer_norm(layer + "self_atten_proj_layer_norm")
        linear(layer + "fc1", ffn, width)
        linear(layer + "fc2", width, ffn)
        layer_norm(layer + "final_layer_norm")
    layer_norm(ENCODER + "emb_layer_norm")
    layer_norm(ENCODER + "proj_emb_layer_norm")
    linear("encoder.lm_head.dense", width, width)
    layer_norm("encoder.lm_head.layer_norm")
    state["encoder.lm_head.weight"] = state[ENCODER + "embed_tokens.weight"]  # tied: the same tensor
    state["encoder.lm_head.bias"] = randn(vocab_size, scale=0.5)
    for name, classes in (heads or {}).items():  # luna_bert decides a head's kind by its name
        head = f"classification_heads.{name}."
        if name == "pooling_classification_head":
            linear(head + "in_proj", width, width)
        if name == "attention_classification_head":
            for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(head + "attn." + projection, width, width)
            layer_norm(head + "layernorm")
        linear(head + "dense", width, width)
        linear(head + "out_proj", classes, width)
    return state


def save_checkpoint(path: Path, args, state, arguments_key="args", **extra) -> Path:
    checkpoint = {
        "model": state,
        "optimizer_history": [{"criterion_name": "MaskedLmLoss", "optimizer_name": "FairseqAdam", "num_updates": 7}],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 7}, "val_loss": 3.5},
        **extra,
    }
    if arguments_key == "args":
        checkpoint["args"] = args
    else:  # newer fairseq: cfg dict with the model arguments under cfg["model"]
        checkpoint["cfg"] = {"common": {"fp16": True}, "model": args, "task": {"_name": "masked_lm"}}
    torch.save(checkpoint, path)
    return path


def convert(tmp_path: Path, checkpoint: Path, name: str = "converted", **options) -> Path:
    arguments = convert_script.Arguments(fairseq_checkpoint=str(checkpoint), output_dir=str(tmp_path / name))
    for key, value in options.items():
        setattr(arguments, key, value)
    return convert_script.convert(arguments)


def padded_tokens(lengths, vocab_size=40, seed=1) -> torch.Tensor:
    """Right-padded batch: <s> (0), random tokens, </s> (2), then <pad> (1)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), max(lengths)), PAD)
    for row, length in enumerate(lengths):
        tokens[row, :length] = torch.randint(4, vocab_size, (length,), generator=generator)
        tokens[row, 0], tokens[row, length - 1] = 0, 2
    return tokens


def max_differences(model, reference, tokens, lengths, dynamic):
    attention_mask = tokens.ne(PAD).long()
    with torch.no_grad():
        base = model.luna(input_ids=tokens, attention_mask=attention_mask)
        logits = model(input_ids=tokens, attention_mask=attention_mask).logits
    assert base.packed_hidden_state.shape == reference["px"].shape
    differences = {"logits": 0.0, "last_hidden_state": 0.0, "packed_hidden_state": 0.0}
    for row, length in enumerate(lengths):
        slots = min(length, reference["px"].shape[1]) if dynamic else reference["px"].shape[1]
        pairs = {
            "logits": (logits[row, :length], reference["logits"][row, :length]),
            "last_hidden_state": (base.last_hidden_state[row, :length], reference["x"][row, :length]),
            "packed_hidden_state": (base.packed_hidden_state[row, :slots], reference["px"][row, :slots]),
        }
        for key, (ours, theirs) in pairs.items():
            differences[key] = max(differences[key], (ours - theirs).abs().max().item())
    return differences


# (untie_luna_kv, fix_projection_length, projection_length, where the arguments are stored)
VARIANTS = {
    "tied-dynamic-l<n": (False, False, 4, "args"),
    "untied-dynamic-l>n": (True, False, 16, "args"),
    "tied-fixed": (False, True, 4, "cfg"),
    "untied-fixed-l>n": (True, True, 12, "args"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_masked_lm_matches_the_fairseq_computation(tmp_path, variant):
    untie, fixed, projection_length, arguments_key = VARIANTS[variant]
    arch = "luna_base_untied_512" if untie else "luna_base_tied_512"
    args = fairseq_args(
        arch=arch, untie_luna_kv=untie, fix_projection_length=fixed, projection_length=projection_length
    )
    state = fairseq_state(args)
    output_dir = convert(tmp_path, save_checkpoint(tmp_path / "model.pt", args, state, arguments_key))

    config = json.loads((output_dir / "config.json").read_text())
    assert config["architectures"] == ["LunaForMaskedLM"]
    assert (config["projected_length"], config["tie_key_value"], config["dynamic_projection"]) == (
        projection_length, not untie, not fixed,
    )  # fmt: skip
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (2, 32, 4)
    assert (config["intermediate_size"], config["vocab_size"], config["max_position_embeddings"]) == (64, 40, 18)
    assert (config["hidden_act"], config["hidden_dropout_prob"], config["attention_probs_dropout_prob"]) == (
        "gelu", 0.1, 0.05,
    )  # fmt: skip
    assert config["classifier_dropout"] == 0.2 and config["pad_token_id"] == PAD
    assert {"configuration_luna.py", "modeling_luna.py", "model.safetensors"} <= {p.name for p in output_dir.iterdir()}
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_luna.LunaForMaskedLM"
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "transformers" and "luna" in card.data.tags
    assert "model.pt" in card.text and f"l = {projection_length}" in card.text and "AutoModelForMaskedLM" in card.text

    lengths = [11, 7, 2]  # the longest row is longer than l=4 and shorter than l=12, 16
    tokens = padded_tokens(lengths)
    reference = fairseq_luna_forward(state, tokens, num_heads=4, dynamic_projection=not fixed)
    for implementation in ("sdpa", "eager"):
        model = AutoModelForMaskedLM.from_pretrained(output_dir, attn_implementation=implementation).eval()
        differences = max_differences(model, reference, tokens, lengths, dynamic=not fixed)
        print(variant, implementation, {k: f"{v:.2e}" for k, v in differences.items()})
        assert max(differences.values()) <= TOLERANCE, differences
    assert model.lm_head.decoder.weight is model.luna.embeddings.word_embeddings.weight

    # In float64 both sides must agree far below float32 rounding: the same computation, not merely a close one.
    # (SDPA: the eager path rounds its softmax to float32 by design.)
    state64 = {name: tensor.double() for name, tensor in state.items()}
    reference = fairseq_luna_forward(state64, tokens, num_heads=4, dynamic_projection=not fixed)
    model = AutoModelForMaskedLM.from_pretrained(output_dir, attn_implementation="sdpa").double().eval()
    differences = max_differences(model, reference, tokens, lengths, dynamic=not fixed)
    print(variant, "float64", {k: f"{v:.2e}" for k, v in differences.items()})
    assert max(differences.values()) <= 1e-12, differences


@pytest.mark.parametrize("task", ["sentence_prediction", "sentence_ranking"])
def test_classification_head_matches_the_fairseq_head(tmp_path, task):
    classes = 3 if task == "sentence_prediction" else 1
    args = fairseq_args(task=task, arch="luna_base_untied_512", untie_luna_kv=True)
    state = fairseq_state(args, heads={"sentence_classification_head": classes}, seed=3)
    output_dir = convert(tmp_path, save_checkpoint(tmp_path / "model.pt", args, state))

    lengths = [9, 5, 6, 3]
    tokens = padded_tokens(lengths, seed=4)
    reference = fairseq_luna_forward(state, tokens, num_heads=4, classification_head="sentence_classification_head")
    config = json.loads((output_dir / "config.json").read_text())
    attention_mask = tokens.ne(PAD).long()
    if task == "sentence_prediction":
        assert config["architectures"] == ["LunaForSequenceClassification"] and len(config["id2label"]) == 3
        model = luna_hf.LunaForSequenceClassification.from_pretrained(output_dir).eval()
        logits = model(input_ids=tokens, attention_mask=attention_mask).logits
        expected = reference["head_logits"]
    else:  # fairseq's sentence_ranking scores each choice with the head; here 2 questions x 2 choices
        assert config["architectures"] == ["LunaForMultipleChoice"]
        model = luna_hf.LunaForMultipleChoice.from_pretrained(output_dir).eval()
        logits = model(input_ids=tokens.view(2, 2, -1), attention_mask=attention_mask.view(2, 2, -1)).logits
        expected = reference["head_logits"].view(2, 2)
    difference = (logits - expected).abs().max().item()
    print(task, f"head logits max abs difference {difference:.2e}")
    assert logits.shape == expected.shape and difference <= TOLERANCE
    assert config["classifier_dropout"] == 0.2


@pytest.mark.parametrize("head_name", ["pooling_classification_head", "attention_classification_head"])
def test_packed_pooling_heads_match_the_fairseq_heads(tmp_path, head_name):
    args = fairseq_args(task="sentence_prediction", projection_length=8)
    state = fairseq_state(args, heads={head_name: 3}, seed=5)
    output_dir = convert(tmp_path, save_checkpoint(tmp_path / "model.pt", args, state))
    config = json.loads((output_dir / "config.json").read_text())
    pooling = {"pooling_classification_head": "packed_max", "attention_classification_head": "packed_attention"}
    assert config["architectures"] == ["LunaForSequenceClassification"]
    assert config["classifier_pooling"] == pooling[head_name] and config["dynamic_projection"]

    lengths = [11, 5, 8, 3]  # P is cut to 8 slots; rows of 5 and 3 tokens mask 3 and 5 of them
    tokens = padded_tokens(lengths, seed=6)
    reference = fairseq_luna_forward(state, tokens, num_heads=4, classification_head=head_name)
    assert reference["px_padding_mask"].sum(dim=1).tolist() == [0, 3, 0, 5]
    model = luna_hf.LunaForSequenceClassification.from_pretrained(output_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=tokens.ne(PAD).long()).logits
        alone = model(input_ids=tokens[3:, :3]).logits  # P cut to 3 slots: nothing masked
    difference = (logits - reference["head_logits"]).abs().max().item()
    print(head_name, f"head logits max abs difference {difference:.2e}")
    assert logits.shape == (4, 3) and difference <= TOLERANCE
    torch.testing.assert_close(alone[0], logits[3], atol=TOLERANCE, rtol=0)


def test_auto_converts_a_pretraining_checkpoint_to_the_masked_lm_despite_registered_heads(tmp_path):
    args = fairseq_args(task="masked_lm")
    heads = {"cls_classification_head": 2, "pooling_classification_head": 3, "attention_classification_head": 4}
    for arguments_key in ("args", "cfg"):
        checkpoint = save_checkpoint(tmp_path / "model.pt", args, fairseq_state(args, heads=heads), arguments_key)
        output_dir = convert(tmp_path, checkpoint, name=arguments_key)
        assert json.loads((output_dir / "config.json").read_text())["architectures"] == ["LunaForMaskedLM"]
    # Naming a head still converts it.
    output_dir = convert(tmp_path, checkpoint, classification_head="attention_classification_head")
    config = json.loads((output_dir / "config.json").read_text())
    assert config["architectures"] == ["LunaForSequenceClassification"] and len(config["id2label"]) == 4


def test_choosing_among_heads_and_replacing_an_output_folder(tmp_path):
    args = fairseq_args(task="sentence_prediction")
    state = fairseq_state(args, heads={"cls_classification_head": 2, "other_head": 5})
    checkpoint = save_checkpoint(tmp_path / "model.pt", args, state)
    with pytest.raises(convert_script.ConversionError, match="several classification heads"):
        convert(tmp_path, checkpoint)
    output_dir = convert(tmp_path, checkpoint, classification_head="other_head")
    assert json.loads((output_dir / "config.json").read_text())["id2label"].keys() == {str(i) for i in range(5)}

    with pytest.raises(convert_script.ConversionError, match="exists and is not empty"):
        convert(tmp_path, checkpoint, head="masked_lm")
    convert(tmp_path, checkpoint, head="masked_lm", overwrite_output_dir=True)  # the pretraining head, heads left out
    assert json.loads((output_dir / "config.json").read_text())["architectures"] == ["LunaForMaskedLM"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model.pt"]


def test_tokenizer_from_fairseq_dictionary_and_gpt2_bpe(tmp_path):
    text = ["the packed sequence is unpacked again", "a long input packs into a short memory", "hello world"] * 5
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))  # GPT-2's file formats: vocab.json ~ encoder.json, merges.txt ~ vocab.bpe
    encoder_json, vocab_bpe = tmp_path / "vocab.json", tmp_path / "merges.txt"
    gpt2_ids = list(json.loads(encoder_json.read_text()).values())
    order = torch.randperm(len(gpt2_ids), generator=torch.Generator().manual_seed(0)).tolist()
    lines = [f"{gpt2_ids[i]} {1000 - rank}" for rank, i in enumerate(order)] + ["madeupword0000 0"]
    (tmp_path / "dict.txt").write_text("\n".join(lines) + "\n")
    fairseq_index = {str(gpt2_ids[i]): 4 + rank for rank, i in enumerate(order)}  # after <s> <pad> </s> <unk>
    vocab_size = 4 + len(lines) + 1  # + <mask>

    args = fairseq_args()
    checkpoint = save_checkpoint(tmp_path / "model.pt", args, fairseq_state(args, vocab_size=vocab_size))
    options = dict(dict=str(tmp_path / "dict.txt"), bpe_encoder_json=str(encoder_json), bpe_vocab=str(vocab_bpe))
    output_dir = convert(tmp_path, checkpoint, **options)

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    sentence = "hello world, the long memory"
    gpt2 = ByteLevelBPETokenizer(str(encoder_json), str(vocab_bpe)).encode(sentence).ids
    expected = [0] + [fairseq_index[str(i)] for i in gpt2] + [2]  # fairseq: bpe -> dictionary indices, <s> ... </s>
    assert tokenizer(sentence)["input_ids"] == expected
    assert tokenizer.decode(expected, skip_special_tokens=True) == sentence
    special = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special == (0, 1, 2, 3)
    assert tokenizer.mask_token_id == vocab_size - 1 == len(tokenizer) - 1
    assert tokenizer.model_max_length == 16
    assert tokenizer("a <mask>")["input_ids"][-2] == vocab_size - 1

    wrong_size = save_checkpoint(tmp_path / "other.pt", args, fairseq_state(args, vocab_size=vocab_size + 8))
    with pytest.raises(convert_script.ConversionError, match="not this model's dictionary"):
        convert(tmp_path, wrong_size, name="wrong", **options)
    assert not (tmp_path / "wrong").exists()


def broken(kind: str, tmp_path: Path) -> Path:
    args = fairseq_args()
    state = fairseq_state(args)
    path = tmp_path / f"{kind}.pt"
    if kind == "non-luna":  # a fairseq RoBERTa checkpoint
        state = {k: v for k, v in state.items() if "projected" not in k and "self_attn." not in k}
        state[ENCODER + "layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)
        args = fairseq_args(arch="roberta_base")
    elif kind == "luna-lra":
        state = {"encoder.layers.0.self_attn.pq_proj.weight": torch.zeros(4, 4)}
        args = fairseq_args(arch="luna_lra_listop", task="lra-text")
    elif kind == "truncated":
        save_checkpoint(path, args, state)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    elif kind == "missing-key":
        del state[ENCODER + "layers.1.fc2.bias"]
    elif kind == "leftover-key":
        state[ENCODER + "layers.0.self_attn.extra_proj.weight"] = torch.zeros(32, 32)
    elif kind == "pre-ln":
        state[ENCODER + "layer_norm.weight"] = torch.ones(32)
    elif kind == "arguments-disagree":
        args = fairseq_args(projection_length=8)
    elif kind == "unknown-head-tensor":  # luna_bert would build a [CLS] head for this name and reject in_proj
        args = fairseq_args(task="sentence_prediction")
        state = fairseq_state(args, heads={"my_head": 2})
        state["classification_heads.my_head.in_proj.weight"] = torch.zeros(32, 32)
    return save_checkpoint(path, args, state)


BAD_INPUTS = {
    "non-luna": "not a Luna model",
    "luna-lra": "another Luna model",
    "truncated": "Is the file complete",
    "missing-key": r"does not provide: \['luna.layers.1.fc2.bias'\]",
    "leftover-key": r"no luna-hf counterpart: \['encoder.sentence_encoder.layers.0.self_attn.extra_proj.weight'\]",
    "pre-ln": "pre-LN",
    "arguments-disagree": "projection_length 8 vs 4",
    "unknown-head-tensor": r"'my_head' has tensors \['classification_heads.my_head.in_proj.weight'\]",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_checkpoints_give_clear_errors_and_write_nothing(tmp_path, kind):
    checkpoint = broken(kind, tmp_path)
    with pytest.raises(convert_script.ConversionError, match=BAD_INPUTS[kind]):
        convert(tmp_path, checkpoint)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name]  # no output folder, no staging leftovers


def test_training_state_of_unknown_classes_loads_safely_but_unknown_arguments_need_trust(tmp_path, monkeypatch):
    # fairseq keeps training meters (fairseq.logging.meters objects) in extra_state; fairseq is not installed here.
    meters = types.ModuleType("fairseq_meters_stub")

    class AverageMeter:
        def __init__(self):
            self.sum, self.count = 3.0, 2

    class MetersDict(collections.OrderedDict):
        pass

    class ModelConfig(argparse.Namespace):  # arguments stored as an object of a class that is not allowlisted
        pass

    for cls in (AverageMeter, MetersDict, ModelConfig):
        cls.__module__, cls.__qualname__ = meters.__name__, cls.__name__
        setattr(meters, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, meters.__name__, meters)
    train = MetersDict(loss=AverageMeter())
    args = fairseq_args()
    state = fairseq_state(args)
    with_meters = save_checkpoint(tmp_path / "meters.pt", args, state, extra_state={"metrics": {"train": train}})
    with_object = save_checkpoint(tmp_path / "object.pt", ModelConfig(**vars(args)), state, arguments_key="cfg")
    monkeypatch.delitem(sys.modules, meters.__name__)

    assert (convert(tmp_path, with_meters, name="meters") / "model.safetensors").exists()
    with pytest.raises(convert_script.ConversionError, match="--trust_pickle"):
        convert(tmp_path, with_object, name="refused")
    assert not (tmp_path / "refused").exists()
    monkeypatch.setitem(sys.modules, meters.__name__, meters)  # the class is importable: full unpickling works
    assert (convert(tmp_path, with_object, name="trusted", trust_pickle=True) / "model.safetensors").exists()


def test_command_line_reports_errors_without_traceback(tmp_path):
    checkpoint = broken("missing-key", tmp_path)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--fairseq_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "error: The checkpoint does not map exactly onto luna-hf" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
