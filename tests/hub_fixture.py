"""Test helpers: tiny Luna models with a tokenizer, a local Hub served by olah, and clean client processes.

No Hub is reachable from the tests, so they talk to a real Hub-compatible HTTP server on 127.0.0.1: `olah`
(PyPI, MIT) in `offline = true` mode serves ordinary git repositories under `<mirrors>/models/<ns>/<name>` with the
Hub's HTTP API (`/api/models/...`, `/<repo>/resolve/<rev>/<file>`). Clients find it through `HF_ENDPOINT`, which
huggingface_hub reads when it is imported, so every client runs in a fresh process (`run_python`).

Where olah's answers differ from the Hub's, `serve()` corrects them with a small ASGI middleware (olah is unmodified):
- a file or folder missing from an existing repository answers `401 RepoNotFound` (the Hub: `404 EntryNotFound`).
  Loaders probe optional files (`additional_chat_templates/`, a model card before a push, ...) and would otherwise
  conclude that the whole repository is missing;
- `/api/models/<ns>/<name>` without a revision is answered only from olah's upstream cache, i.e. never in offline
  mode (`401`); the Hub answers with the default branch, so the request is routed to `.../revision/main`;
- olah, a read-only mirror, has no `POST /api/validate-yaml` (405), which `upload_folder` calls for a README.md: the
  middleware answers it by parsing the card with huggingface_hub's `ModelCard` (400 with the error if that fails).

No installable server accepts uploads: `redirect_commits_to_git()` replaces only `HfApi.create_repo` and
`HfApi.create_commit` with versions that write into the olah-served git repository. Everything else in
`push_to_hub` / `Trainer(push_to_hub=True)` (model card download, `upload_folder`, the operations) runs for real.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PYTHON = sys.executable
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: <s> 0, <pad> 1, </s> 2, <unk> 3
TOKENIZER_TEXT = [
    "the movie was good and the actors were great",
    "a bad film with a boring plot and terrible acting",
    "Paris is the capital of France and Berlin is the capital of Germany",
    "who wrote the book ? the book was written by Jane Austen in England",
    "Luna packs the sequence into a short memory and unpacks it again",
    "what is the capital of France ? how are you today ?",
]

# ---------------------------------------------------------------------------------------------------------------
# Tiny models


def build_tokenizer(folder=None):
    """A byte-level BPE trained here with `tokenizers`, wrapped as RoBERTa's tokenizer (pad id 1, `<mask>`)."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TOKENIZER_TEXT * 4, vocab_size=400, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = RobertaTokenizer(
        vocab=model["vocab"], merges=merges, mask_token=AddedToken("<mask>", lstrip=True, rstrip=False)
    )
    assert tokenizer.pad_token_id == 1 and tokenizer.mask_token_id == 4
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_luna_config(tokenizer, **kwargs):
    from luna_hf import LunaConfig

    defaults = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        projected_length=4,
        max_position_embeddings=130,
    )
    return LunaConfig(**{**defaults, **kwargs})


def save_tiny_model(model_class, folder, tokenizer=None, seed=0, **config_kwargs):
    """A random tiny `model_class` (a Luna head) saved with its remote code and a tokenizer beside it."""
    import torch

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = model_class(tiny_luna_config(tokenizer, **config_kwargs)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Tiny GLUE-format data (GLUE's own TSV layouts: no quoting, literal `"` in the text, a space before SST-2's tab)

POSITIVE = ["the movie was good", "great actors and a good plot", "a good film", '" great " acting', "good and great"]
NEGATIVE = ["a bad film", "boring plot and terrible acting", "the movie was bad", 'a "bad" movie', "terrible , boring"]
QUESTIONS = [("what is the capital of France ?", "Paris is the capital of France .", "entailment"),
             ("who wrote the book ?", '" the book was written by Jane Austen', "entailment"),
             ("what is the capital of France ?", "the movie was bad .", "not_entailment"),
             ("who wrote the book ?", "Berlin is the capital of Germany .", "not_entailment")]
QUESTION_PAIRS = [('How can I know the ""real"" capital of France?', "what is the capital of France ?", 1),
                  ("who wrote the book ?", "who wrote the book?", 1),
                  ("how are you today ?", "what is the capital of France ?", 0),
                  ('what is a "good" film ?', "who wrote the book ?", 0)]


def write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, row)) + "\n" for row in rows))
    return path


def write_glue_fixture(root, sst2_folder="sst2", train_rows=48):
    """SST-2 (train/dev/test), QNLI (train_subset/dev with an index column), QQP (train_subset/heldout_subset)."""
    root = Path(root)
    sst2 = [(f"{(POSITIVE if i % 2 else NEGATIVE)[i // 2 % 5]} ", i % 2) for i in range(train_rows)]
    write_tsv(root / sst2_folder / "train.tsv", ["sentence", "label"], sst2)
    write_tsv(root / sst2_folder / "dev.tsv", ["sentence", "label"], sst2[:16])
    write_tsv(root / sst2_folder / "test.tsv", ["index", "sentence"], [(i, s) for i, (s, _) in enumerate(sst2[:6])])
    qnli = [QUESTIONS[i % 4] for i in range(24)]
    write_tsv(root / "qnli" / "train_subset.tsv", ["question", "sentence", "label"], qnli)
    qnli_dev = [(i, *row) for i, row in enumerate(qnli[:8])]
    write_tsv(root / "qnli" / "dev.tsv", ["index", "question", "sentence", "label"], qnli_dev)
    qqp = [QUESTION_PAIRS[i % 4] for i in range(24)]
    write_tsv(root / "qqp" / "train_subset.tsv", ["question1", "question2", "is_duplicate"], qqp)
    write_tsv(root / "qqp" / "heldout_subset.tsv", ["question1", "question2", "is_duplicate"], qqp[:8])
    return root


# ---------------------------------------------------------------------------------------------------------------
# Client processes

BLOCK_LUNA_HF = """
import sys
class _RefuseLunaHf:  # this process must behave as if luna_hf had never been installed
    def find_spec(self, name, path=None, target=None):
        if name == "luna_hf" or name.startswith("luna_hf."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _RefuseLunaHf())
try:
    import luna_hf
    raise SystemExit("luna_hf is importable in the isolated process")
except ModuleNotFoundError:
    pass
"""


def clean_env(hf_home, **extra):
    """Environment for a client process: its own HF_HOME (empty caches), no offline flags, no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", TOKENIZERS_PARALLELISM="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code, env, without_luna_hf=False, cwd=None, timeout=300):
    """Runs `code` in a fresh interpreter; returns the JSON object on its last stdout line."""
    code = (BLOCK_LUNA_HF if without_luna_hf else "") + code
    result = subprocess.run([PYTHON, "-c", code], env=env, cwd=cwd or tempfile.gettempdir(), capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{output}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# The local Hub


def olah_installed():
    import importlib.util

    return importlib.util.find_spec("olah") is not None


def git(cwd, *args):
    """git without the user's or the system's configuration (no signing, hooks, LFS filters)."""
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "test"}
    env.update(GIT_AUTHOR_EMAIL="test@localhost", GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@localhost")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def init_git_repo(path):
    """An empty Hub repository, as `create_repo` leaves it: branch main, one commit with .gitattributes."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / ".gitattributes").write_text("# plain git blobs: olah serves them without LFS\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial commit")


class LocalHub:
    """olah on 127.0.0.1 in offline mode, serving the git repositories under `root/mirrors`."""

    def __init__(self, root):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.mirrors.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.root / "cache"}"\nmirrors-path = ["{self.mirrors}"]\n'
            "[accessibility]\noffline = true\n"
        )
        self.log = open(self.root / "olah.log", "w")  # closed in stop()
        self.process = subprocess.Popen(
            [PYTHON, __file__, "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root
        )
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/api/whoami-v2", timeout=2)
            except urllib.error.HTTPError:
                break  # the server answers (401: no token)
            except OSError as error:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    log = (self.root / "olah.log").read_text()[-3000:]
                    raise RuntimeError(f"olah did not start:\n{log}") from error
                time.sleep(0.2)

    def repo_path(self, repo_id):
        return self.mirrors / "models" / repo_id

    def client_env(self, hf_home):
        return clean_env(hf_home, HF_ENDPOINT=self.endpoint)

    def files(self, repo_id, revision="main"):
        return sorted(git(self.repo_path(repo_id), "ls-tree", "-r", "--name-only", revision).splitlines())

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.log.close()


def serve(config_path):
    """Runs olah's app with its config (as `python -m olah.server -c config` does) plus the corrections above."""
    import uvicorn
    from olah.configs import OlahConfig
    from olah.server import AppSettings, app
    from starlette.responses import JSONResponse, Response

    config = OlahConfig(config_path)
    app.state.app_settings = AppSettings(config=config)
    mirrors = [Path(p) for p in config.mirrors_path]
    repo_info = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)$")
    entry = re.compile(r"^/(?:api/)?(?:(models|datasets|spaces)/)?([^/]+)/([^/]+)/(?:resolve|tree|paths-info)/")

    def repo_exists(repo_type, org, name):
        return any((root / (repo_type or "models") / org / name / ".git").exists() for root in mirrors)

    @app.middleware("http")
    async def hub_semantics(request, call_next):
        path = request.scope["path"]
        if path == "/api/validate-yaml" and request.method == "POST":  # the upload path checks the card's metadata
            from huggingface_hub import ModelCard

            try:
                ModelCard((await request.json())["content"])
            except ValueError as error:
                return JSONResponse({"errors": [{"message": str(error)}], "warnings": []}, 400)
            return JSONResponse({"errors": [], "warnings": []})
        match = repo_info.match(path)
        if match and repo_exists(*match.groups()):
            request.scope["path"] = path + "/revision/main"
        response = await call_next(request)
        match = entry.match(path)
        if response.status_code == 401 and match and repo_exists(*match.groups()):
            headers = {"x-error-code": "EntryNotFound", "x-error-message": "Entry not found"}
            return Response(b'{"error":"Entry not found"}', 404, headers, media_type="application/json")
        return response

    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


# ---------------------------------------------------------------------------------------------------------------
# Pushing: commits go into the olah-served git repository


def redirect_commits_to_git(mirrors):
    """Replaces `HfApi.create_repo` / `HfApi.create_commit` (only those) with writes into `mirrors/models/<repo>`."""
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import CommitInfo, RepoUrl

    mirrors = Path(mirrors)
    lock = threading.Lock()  # Trainer pushes checkpoints from a background thread

    def create_repo(self, repo_id, *, exist_ok=False, repo_type=None, **kwargs):
        path = mirrors / f"{repo_type or 'model'}s" / repo_id
        with lock:
            if not path.exists():
                init_git_repo(path)
            elif not exist_ok:
                raise FileExistsError(f"{repo_id} exists")
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, revision=None,
                      repo_type=None, **kwargs):
        path = mirrors / f"{repo_type or 'model'}s" / repo_id
        with lock:
            git(path, "checkout", "-q", revision or "main")
            for op in operations:
                target = path / op.path_in_repo
                if isinstance(op, CommitOperationAdd):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with op.as_file() as source:
                        target.write_bytes(source.read())
                elif isinstance(op, CommitOperationDelete):
                    git(path, "rm", "-r", "-q", "--ignore-unmatch", op.path_in_repo)
                elif isinstance(op, CommitOperationCopy):
                    target.write_bytes((path / op.src_path_in_repo).read_bytes())
            git(path, "add", "-A")
            message = commit_message + (f"\n\n{commit_description}" if commit_description else "")
            git(path, "commit", "-q", "--allow-empty", "-m", message)
            sha = git(path, "rev-parse", "HEAD")
        url = f"{self.endpoint}/{repo_id}/commit/{sha}"
        return CommitInfo(commit_url=url, commit_message=commit_message, commit_description=commit_description or "",
                          oid=sha, _endpoint=self.endpoint)

    HfApi.create_repo = create_repo
    HfApi.create_commit = create_commit


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2])
