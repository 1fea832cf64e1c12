"""The transformers releases luna-hf supports, checked when the package is imported: outside them the models' own
imports would fail deep inside, with a message about something else. pyproject.toml declares the same range, and
scripts/version_matrix.py tests its ends (and 4.57, where saved encoder folders load through remote code)."""

import transformers
from packaging.version import Version

SUPPORTED_TRANSFORMERS = ">=5.9,<6"
OLDEST, FIRST_UNSUPPORTED = Version("5.9"), Version("6")

if not OLDEST <= Version(Version(transformers.__version__).base_version) < FIRST_UNSUPPORTED:
    raise ImportError(
        f"luna-hf supports transformers {SUPPORTED_TRANSFORMERS}; {transformers.__version__} is installed. Run: pip "
        f"install 'transformers{SUPPORTED_TRANSFORMERS}' (folders saved by luna-hf also load their encoder models on "
        "transformers 4.57, with trust_remote_code=True and without luna-hf)."
    )
