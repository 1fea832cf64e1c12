"""pipeline() on tiny random Luna models saved with a tokenizer: in this process (luna_hf registered) and in a fresh
process where luna_hf cannot be imported (the folders' remote code, `trust_remote_code=True`).

fill-mask, text-classification, feature-extraction and token-classification run through `pipeline()`, checked
against the model's own outputs. transformers 5.3 removed the question-answering pipeline (huggingface/transformers
#43325; its migration guide says to use AutoModelForQuestionAnswering directly), so question answering is tested the
way that guide shows: tokenizer, AutoModelForQuestionAnswering, best span from the start/end logits.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from luna_hf import (
    LunaForMaskedLM,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
    LunaModel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402

MASKED = "the movie was <mask> and the actors were great"
SENTENCES = ["a good film", "boring plot and terrible acting"]
PAIR = {"text": "who wrote the book ?", "text_pair": "the book was written by Jane Austen"}
NER = "Paris is the capital of France"
QUESTION, CONTEXT = "what is the capital of France ?", "Paris is the capital of France and Berlin is in Germany ."
ENTITIES = {0: "O", 1: "B-LOC", 2: "I-LOC"}

# The same calls, as source, for both processes; `trust` is True only in the process without luna_hf.
RUN = f"""
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline

def answer(folder, trust):
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    model = AutoModelForQuestionAnswering.from_pretrained(folder, trust_remote_code=trust).eval()
    inputs = tokenizer({QUESTION!r}, {CONTEXT!r}, return_offsets_mapping=True, return_tensors="pt")
    offsets = inputs.pop("offset_mapping")[0]
    in_context = torch.tensor([sequence == 1 for sequence in inputs.sequence_ids(0)])
    with torch.no_grad():
        out = model(**inputs)
    start = out.start_logits[0].masked_fill(~in_context, -1e4).log_softmax(-1)
    end = out.end_logits[0].masked_fill(~in_context, -1e4).log_softmax(-1)
    spans = (start[:, None] + end[None, :]).triu().tril(15)  # start <= end, at most 16 tokens
    spans = spans.masked_fill(spans == 0, -1e9)
    best = int(spans.argmax())
    first, last = divmod(best, spans.shape[1])
    begin, stop = int(offsets[first][0]), int(offsets[last][1])
    score = float(spans.flatten()[best].exp())
    return {{"answer": {CONTEXT!r}[begin:stop], "start": begin, "end": stop, "score": score,
            "module": type(model).__module__}}

def plain(value):  # numpy scalars -> Python numbers, tuples -> lists (JSON-comparable)
    if isinstance(value, dict):
        return {{key: plain(item) for key, item in value.items()}}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value.item() if hasattr(value, "item") else value

def run_all(folders, trust):
    fill = pipeline("fill-mask", model=folders["mlm"], trust_remote_code=trust)
    classify = pipeline("text-classification", model=folders["cls"], trust_remote_code=trust)
    features = pipeline("feature-extraction", model=folders["base"], trust_remote_code=trust)
    ner = pipeline("token-classification", model=folders["tok"], trust_remote_code=trust, ignore_labels=[])
    return plain({{
        "fill": fill({MASKED!r}, top_k=3),
        "classify": classify({SENTENCES!r}, top_k=None),
        "pair": classify({PAIR!r}),
        "features": features({SENTENCES[0]!r}),
        "ner": ner({NER!r}),
        "qa": answer(folders["qa"], trust),
        "modules": [type(p.model).__module__ for p in (fill, classify, features, ner)],
    }})
"""
namespace = {}
exec(RUN, namespace)  # the in-process half of the comparison
run_all = namespace["run_all"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    tokenizer = hub_fixture.build_tokenizer()
    heads = {
        "mlm": (LunaForMaskedLM, {}),
        "cls": (LunaForSequenceClassification, {"id2label": {0: "negative", 1: "positive"}}),
        "base": (LunaModel, {}),
        "tok": (LunaForTokenClassification, {"id2label": ENTITIES}),
        "qa": (LunaForQuestionAnswering, {}),
    }
    for seed, (name, (model_class, kwargs)) in enumerate(heads.items()):
        label2id = {v: k for k, v in kwargs["id2label"].items()} if kwargs else {}
        hub_fixture.save_tiny_model(model_class, root / name, tokenizer, seed=seed, **kwargs,
                                    **({"label2id": label2id} if label2id else {}))
    return {name: str(root / name) for name in heads}


@pytest.fixture(scope="module")
def in_process(folders):
    return run_all(folders, trust=False)


def load(model_class, folder):
    return AutoTokenizer.from_pretrained(folder), model_class.from_pretrained(folder).eval()


def test_fill_mask_ranks_the_models_own_predictions(folders, in_process):
    tokenizer, model = load(LunaForMaskedLM, folders["mlm"])
    inputs = tokenizer(MASKED, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, inputs.input_ids[0].tolist().index(tokenizer.mask_token_id)]
    top = logits.softmax(-1).topk(3)
    assert [f["token"] for f in in_process["fill"]] == top.indices.tolist()
    assert [f["score"] for f in in_process["fill"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert in_process["fill"][0]["sequence"].startswith("the movie was")


def test_text_classification_uses_label_names_and_model_probabilities(folders, in_process):
    tokenizer, model = load(LunaForSequenceClassification, folders["cls"])
    with torch.no_grad():
        single = model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits.softmax(-1)
        pair = model(**tokenizer(PAIR["text"], PAIR["text_pair"], return_tensors="pt")).logits.softmax(-1)[0]
    for scores, probabilities in zip(in_process["classify"], single, strict=True):
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(
            {"negative": float(probabilities[0]), "positive": float(probabilities[1])}, abs=1e-6)
    assert in_process["pair"]["label"] == ["negative", "positive"][int(pair.argmax())]
    assert in_process["pair"]["score"] == pytest.approx(float(pair.max()), abs=1e-6)


def test_feature_extraction_returns_the_last_hidden_state(folders, in_process):
    tokenizer, model = load(LunaModel, folders["base"])
    with torch.no_grad():
        hidden = model(**tokenizer(SENTENCES[0], return_tensors="pt")).last_hidden_state
    assert torch.tensor(in_process["features"]) == pytest.approx(hidden, abs=1e-5)
    assert hidden.shape[-1] == 32 and hidden.shape[1] > 3


def test_token_classification_labels_every_token(folders, in_process):
    tokenizer, model = load(LunaForTokenClassification, folders["tok"])
    inputs = tokenizer(NER, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**inputs).logits[0].softmax(-1)[1:-1]  # without <s> and </s>
    entities = in_process["ner"]
    assert [e["index"] for e in entities] == list(range(1, len(probabilities) + 1))
    assert [e["entity"] for e in entities] == [ENTITIES[int(i)] for i in probabilities.argmax(-1)]
    assert [e["score"] for e in entities] == pytest.approx(probabilities.max(-1).values.tolist(), abs=1e-6)
    assert "".join(NER[e["start"]:e["end"]] for e in entities) == NER.replace(" ", "")


def test_question_answering_span_from_start_and_end_logits(folders, in_process):
    qa = in_process["qa"]
    assert qa["answer"] == CONTEXT[qa["start"]:qa["end"]] and qa["answer"].strip()
    assert 0 < qa["score"] <= 1 and qa["start"] >= 0 and qa["end"] <= len(CONTEXT)
    assert qa["module"] == "luna_hf.modeling_luna"


def test_remote_code_in_a_process_without_luna_hf_gives_the_same_outputs(folders, in_process, tmp_path):
    code = RUN + f"\nimport json\nprint(json.dumps(run_all({folders!r}, trust=True)))\n"
    remote = hub_fixture.run_python(code, hub_fixture.clean_env(tmp_path / "home", HF_HUB_OFFLINE=1),
                                    without_luna_hf=True)
    for module in remote["modules"] + [remote["qa"]["module"]]:
        assert module.startswith("transformers_modules."), module  # the folders' own code
    for module in in_process["modules"] + [in_process["qa"]["module"]]:
        assert module.startswith("luna_hf."), module

    def outputs(result):
        return {**{k: v for k, v in result.items() if k != "modules"},
                "qa": {k: v for k, v in result["qa"].items() if k != "module"}}

    assert_close(outputs(remote), outputs(in_process))


def assert_close(a, b):
    """Same structure and strings; numbers equal to 1e-5."""
    if isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in b:
            assert_close(a[key], b[key])
    elif isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_close(x, y)
    elif isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5)
    else:
        assert a == b
