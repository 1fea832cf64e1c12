"""transformers' own common model tests, matched to the installed version, for `test_peer_common.py`.

The transformers sdist on PyPI carries the top-level `tests/*.py` (`ModelTesterMixin`, `ConfigTester`) of exactly
the installed release. They are fetched once with pip into `.peer_tests/` (gitignored) and imported as the package
`hf_peer_tests`. The three helper modules they import from sub-folders the sdist lacks are written as stubs:
ModelTesterMixin's export and generation base classes (Luna is an encoder: nothing to export-test or generate) and
ConfigTester's common kwargs. Without network or `parameterized`, the importing module is skipped with the reason.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import pytest
import transformers

pytest.importorskip("parameterized", reason="transformers' common tests need `parameterized` (pip install -e .[dev])")

CACHE = Path(__file__).resolve().parents[1] / ".peer_tests" / transformers.__version__
PACKAGE = CACHE / "hf_peer_tests"

STUBS = {
    "__init__.py": "",
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/__init__.py": "",
    # The dict of transformers' tests/utils/test_configuration_utils.py (v5).
    "utils/test_configuration_utils.py": """config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
""",
}


def fetch() -> None:
    """Download the sdist, extract its top-level `tests/*.py` and write the stubs (atomically, once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"transformers-{transformers.__version__}.tar.gz"
    if not sdist.exists():
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--retries", "1"]
        command += ["--timeout", "20", "-d", str(CACHE), f"transformers=={transformers.__version__}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not sdist.exists():
            last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(
                f"cannot download the transformers {transformers.__version__} sdist: {last_line}",
                allow_module_level=True,
            )
    staging = Path(tempfile.mkdtemp(dir=CACHE))
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                (staging / parts[2]).parent.mkdir(parents=True, exist_ok=True)
                (staging / parts[2]).write_bytes(archive.extractfile(member).read())
    for name, text in STUBS.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
    try:
        staging.rename(PACKAGE)
    except OSError:  # another process finished first
        shutil.rmtree(staging)


if not (PACKAGE / "test_modeling_common.py").exists():
    fetch()
sys.path.insert(0, str(CACHE))

with warnings.catch_warnings():  # their marks (flash_attn_test, ...) are registered by transformers' conftest only
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from hf_peer_tests.test_configuration_common import ConfigTester
    from hf_peer_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

__all__ = ["ConfigTester", "ModelTesterMixin", "ids_tensor", "random_attention_mask"]
