"""Publishing through the Hub's HTTP API, offline: push with the real `push_to_hub` code, load back over HTTP.

A local olah server (tests/hub_fixture.py) serves git repositories on 127.0.0.1. The publisher process runs
`scripts/finetune_glue.py --push_to_hub` (Trainer pushes) and `LunaForMaskedLM.push_to_hub`, with only
`HfApi.create_repo` / `create_commit` redirected into those git repositories. A second process, where `luna_hf`
cannot be imported, loads the results from the server with `trust_remote_code=True` and runs `pipeline()`.
Set HUGGINGFACE_CO_STAGING=1 (and HF_STAGING_TOKEN) to run the same round trip against the Hub's staging server.
"""

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from luna_hf import LunaForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune_glue.py"
CLASSIFIER, MLM = "test-org/luna-tiny-sst2", "test-org/luna-tiny-mlm"
SENTENCES = ["a good film", "boring plot and terrible acting"]
MASKED = "the movie was <mask>"

pytestmark = pytest.mark.skipif(not hub_fixture.olah_installed(), reason="needs olah (pip install olah)")


def publish(env, work, classifier=CLASSIFIER, mlm=MLM, mirrors=None, task="sst2", files=("train.tsv", "dev.tsv"),
            output="out"):  # fmt: skip
    """Pushes a tiny MLM (model.push_to_hub) and a finetuned classifier (finetune_glue.py --push_to_hub)."""
    redirect = f"hub_fixture.redirect_commits_to_git({str(mirrors)!r})" if mirrors else ""
    args = ["--model_name_or_path", str(work / "mlm"), "--task_name", task, "--do_train", "--do_eval",
            "--train_file", str(work / "glue" / task / files[0]),
            "--validation_file", str(work / "glue" / task / files[1]),
            "--output_dir", str(work / output), "--num_train_epochs", "2", "--learning_rate", "3e-3",
            "--per_device_train_batch_size", "16", "--eval_strategy", "epoch", "--save_strategy", "epoch",
            "--max_seq_length", "32", "--report_to", "none", "--use_cpu", "--dataloader_pin_memory", "False",
            "--push_to_hub", "--hub_model_id", classifier, "--disable_tqdm", "True"]
    code = f"""
import json, runpy, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import hub_fixture
{redirect}
import luna_hf
from transformers import AutoModelForMaskedLM, AutoTokenizer
AutoModelForMaskedLM.from_pretrained({str(work / "mlm")!r}).push_to_hub({mlm!r})
AutoTokenizer.from_pretrained({str(work / "mlm")!r}).push_to_hub({mlm!r})
sys.argv = ["finetune_glue.py", *{args!r}]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
print(json.dumps({{"ok": True}}))
"""
    return hub_fixture.run_python(code, env, timeout=600)


def consume(env, classifier=CLASSIFIER, mlm=MLM):
    """In a process without luna_hf: Auto classes and pipelines, all files fetched over HTTP."""
    code = f"""
import json, torch
from huggingface_hub import HfApi
from transformers import AutoModelForSequenceClassification, pipeline
model = AutoModelForSequenceClassification.from_pretrained({classifier!r}, trust_remote_code=True)
classify = pipeline("text-classification", model={classifier!r}, trust_remote_code=True)
fill = pipeline("fill-mask", model={mlm!r}, trust_remote_code=True)
print(json.dumps({{
    "model_module": type(model).__module__, "id2label": model.config.id2label,
    "pipeline_module": type(classify.model).__module__, "fill_module": type(fill.model).__module__,
    "classify": classify({SENTENCES!r}), "fill": fill({MASKED!r}, top_k=3),
    "sha": HfApi().model_info({classifier!r}).sha,
}}))
"""
    return hub_fixture.run_python(code, env, without_luna_hf=True)


def expected_outputs(classifier_dir, mlm_dir):
    """The same predictions computed here, with the installed package, from the files that were pushed."""
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        probabilities = model(**tokenizer(SENTENCES, return_tensors="pt", padding=True)).logits.softmax(-1)
    classify = [{"label": model.config.id2label[int(p.argmax())], "score": float(p.max())} for p in probabilities]
    mlm_tokenizer = AutoTokenizer.from_pretrained(mlm_dir)
    mlm = AutoModelForMaskedLM.from_pretrained(mlm_dir).eval()
    inputs = mlm_tokenizer(MASKED, return_tensors="pt")
    with torch.no_grad():
        logits = mlm(**inputs).logits[0, inputs.input_ids[0].tolist().index(mlm_tokenizer.mask_token_id)]
    top = logits.softmax(-1).topk(3)
    return classify, [(int(i), float(s)) for s, i in zip(top.values, top.indices, strict=True)]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    work = tmp_path_factory.mktemp("publish")
    hub_fixture.write_glue_fixture(work / "glue")
    hub_fixture.save_tiny_model(LunaForMaskedLM, work / "mlm")
    hub = hub_fixture.LocalHub(work / "hub")
    try:
        publish(hub.client_env(work / "home-publisher"), work, mirrors=hub.mirrors)
        yield hub, work
    finally:
        hub.stop()


def test_push_uploads_weights_tokenizer_remote_code_and_card(published):
    hub, work = published
    files = hub.files(CLASSIFIER)
    assert {"model.safetensors", "config.json", "configuration_luna.py", "modeling_luna.py", "tokenizer.json",
            "tokenizer_config.json", "README.md", "eval_results.json"} <= set(files)
    assert not any(f.startswith("checkpoint-") or f.startswith("_") for f in files)
    history = hub_fixture.git(hub.repo_path(CLASSIFIER), "log", "--format=%s").splitlines()
    assert history[0] == "Finetuned on sst2" and "Training in progress, epoch 1" in history  # Trainer's own pushes
    assert {"model.safetensors", "modeling_luna.py", "tokenizer.json", "README.md"} <= set(hub.files(MLM))
    config = json.loads((hub.repo_path(CLASSIFIER) / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_luna.LunaForSequenceClassification"

    card = ModelCard.load(hub.repo_path(CLASSIFIER) / "README.md")
    assert (work / "out" / "README.md").read_text() == card.content  # the local folder carries the pushed card
    accuracy = json.loads((work / "out" / "eval_results.json").read_text())["eval_accuracy"]
    result = card.data.eval_results[0]
    assert (result.metric_type, result.dataset_config, result.metric_value) == ("accuracy", "sst2", accuracy)
    assert card.data.pipeline_tag == "text-classification" and card.data.license == "apache-2.0"
    assert f"| accuracy | {accuracy:.4f} |" in card.text
    assert "| learning rate | 0.003 |" in card.text and "epochs (max / run) | 2 / 2" in card.text
    assert "`0` = `negative`, `1` = `positive`" in card.text
    assert "@inproceedings{ma2021luna" in card.text and "Not the 2025" in card.text and "Socher et al." in card.text
    assert 'pipeline("text-classification", model="test-org/luna-tiny-sst2", trust_remote_code=True)' in card.text


def test_load_over_http_without_the_package(published):
    hub, work = published
    got = consume(hub.client_env(work / "home-consumer"))
    for key in ("model_module", "pipeline_module", "fill_module"):
        assert got[key].startswith("transformers_modules."), got[key]  # the repo's code, not luna_hf
    assert got["id2label"] == {"0": "negative", "1": "positive"}
    assert got["sha"] == hub_fixture.git(hub.repo_path(CLASSIFIER), "rev-parse", "HEAD")
    classify, fill = expected_outputs(hub.repo_path(CLASSIFIER), hub.repo_path(MLM))
    assert [c["label"] for c in got["classify"]] == [c["label"] for c in classify]
    assert [c["score"] for c in got["classify"]] == pytest.approx([c["score"] for c in classify], abs=1e-5)
    assert [f["token"] for f in got["fill"]] == [token for token, _ in fill]
    assert [f["score"] for f in got["fill"]] == pytest.approx([score for _, score in fill], abs=1e-5)


def test_local_hub_answers_like_the_hub(published):
    """The two olah answers the fixture corrects, and what it leaves alone."""
    hub, _ = published

    def status(path, method="GET"):
        try:
            with urllib.request.urlopen(urllib.request.Request(hub.endpoint + path, method=method)) as response:
                return response.status, dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers)

    code, headers = status(f"/{CLASSIFIER}/resolve/main/config.json", "HEAD")
    assert code == 200 and headers["x-repo-commit"] == hub_fixture.git(hub.repo_path(CLASSIFIER), "rev-parse", "HEAD")
    assert status(f"/{CLASSIFIER}/resolve/main/adapter_config.json", "HEAD")[1]["x-error-code"] == "EntryNotFound"
    assert status(f"/api/models/{CLASSIFIER}/tree/main/additional_chat_templates")[0] == 404
    assert status(f"/api/models/{CLASSIFIER}")[0] == 200
    assert status("/api/models/test-org/missing")[1]["x-error-code"] == "RepoNotFound"


@pytest.mark.skipif(os.environ.get("HUGGINGFACE_CO_STAGING") != "1", reason="set HUGGINGFACE_CO_STAGING=1 to run")
def test_live_round_trip_on_hub_staging(tmp_path):
    """The same push and load against https://hub-ci.huggingface.co with real create_repo/create_commit."""
    token = os.environ.get("HF_STAGING_TOKEN")
    if not token:
        pytest.skip("HF_STAGING_TOKEN (a write token for the staging Hub) is not set")
    from huggingface_hub import HfApi

    endpoint = "https://hub-ci.huggingface.co"
    user = HfApi(endpoint=endpoint, token=token).whoami()["name"]
    suffix = os.urandom(4).hex()
    classifier, mlm = f"{user}/luna-tiny-sst2-{suffix}", f"{user}/luna-tiny-mlm-{suffix}"
    hub_fixture.write_glue_fixture(tmp_path / "glue")
    hub_fixture.save_tiny_model(LunaForMaskedLM, tmp_path / "mlm")
    env = hub_fixture.clean_env(tmp_path / "home", HF_ENDPOINT=endpoint, HF_TOKEN=token)
    try:
        publish(env, tmp_path, classifier, mlm)
        got = consume(env, classifier, mlm)
        assert got["model_module"].startswith("transformers_modules.") and got["id2label"]["1"] == "positive"
        assert len(got["classify"]) == 2 and len(got["fill"]) == 3
    finally:
        api = HfApi(endpoint=endpoint, token=token)
        for repo in (classifier, mlm):
            api.delete_repo(repo, missing_ok=True)


QNLI = "test-org/luna-tiny-qnli"
PAIRS = [{"text": question, "text_pair": sentence} for question, sentence, _ in hub_fixture.QUESTIONS]


def test_a_published_qnli_model_answers_sentence_pairs_with_its_label_names(published):
    """finetune_glue.py --push_to_hub on QNLI; in a process without luna_hf, the text-classification pipeline
    classifies (question, sentence) pairs with the task's label names, as the model does on the pairs tokenized
    together; the card carries the GLUE metric in its model-index."""
    hub, work = published
    publish(hub.client_env(work / "home-qnli"), work, classifier=QNLI, mlm="test-org/luna-tiny-mlm-2",
            mirrors=hub.mirrors, task="qnli", files=("train_subset.tsv", "dev.tsv"), output="qnli")  # fmt: skip
    card = ModelCard.load(hub.repo_path(QNLI) / "README.md")
    accuracy = json.loads((work / "qnli" / "eval_results.json").read_text())["eval_accuracy"]
    result = card.data.eval_results[0]
    assert (result.metric_type, result.dataset_config, result.metric_value) == ("accuracy", "qnli", accuracy)
    code = f"""
import json
from transformers import pipeline
classify = pipeline("text-classification", model={QNLI!r}, trust_remote_code=True)
print(json.dumps({{"module": type(classify.model).__module__, "answers": classify({PAIRS!r})}}))
"""
    got = hub_fixture.run_python(code, hub.client_env(work / "home-qnli-consumer"), without_luna_hf=True)
    assert got["module"].startswith("transformers_modules.")
    tokenizer = AutoTokenizer.from_pretrained(hub.repo_path(QNLI))
    model = AutoModelForSequenceClassification.from_pretrained(hub.repo_path(QNLI)).eval()
    encoded = tokenizer([p["text"] for p in PAIRS], [p["text_pair"] for p in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**encoded).logits.softmax(-1)
    assert [a["label"] for a in got["answers"]] == [model.config.id2label[int(p.argmax())] for p in probabilities]
    assert {a["label"] for a in got["answers"]} <= {"entailment", "not_entailment"}
    assert [a["score"] for a in got["answers"]] == pytest.approx([float(p.max()) for p in probabilities], abs=1e-5)
