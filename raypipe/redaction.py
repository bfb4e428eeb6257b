"""Masking credentials by their structure, wherever raypipe writes or prints text: the
user-info of a URI (`s3://KEY:SECRET@bucket`, `https://user:p@ss@host`), query parameters that
carry a secret (`?token=…`, an Azure SAS's `sig=…`), and the value of any environment
variable whose name says it holds one (`…_TOKEN`, `…_SECRET…`, `AWS_ACCESS_KEY_ID`,
`AZURE_STORAGE_CONNECTION_STRING`, …), not a fixed list of names."""

from __future__ import annotations

import os
import re

MASK = "***"
# scheme://user-info@ : everything up to the last @ before the host (a password may hold @).
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]+@")
_SECRET_WORDS = {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "SAS"}
_SECRET_PAIRS = {"ACCESS_KEY", "ACCOUNT_KEY", "API_KEY", "PRIVATE_KEY", "CONNECTION_STRING",
                 "CLIENT_SECRET", "AUTH_TOKEN"}  # fmt: skip
_PARAM = re.compile(
    r"([?&;](?:[^=&#\s]*?(?:token|sig|signature|secret|password|passwd|key|credential|auth)"
    r"[^=&#\s]*)=)[^&#\s'\"]+",
    re.IGNORECASE,
)
_MIN_SECRET = 6  # shorter values ("true", "1") would mask ordinary text


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says its value is a secret."""
    parts = name.upper().split("_")
    pairs = {f"{a}_{b}" for a, b in zip(parts, parts[1:], strict=False)}
    return bool(_SECRET_WORDS.intersection(parts) or _SECRET_PAIRS.intersection(pairs))


def secret_values() -> list[str]:
    """The values of this process's secret-looking environment variables, longest first."""
    found = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET}
    return sorted(found, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every credential it shows masked."""
    for value in secret_values():  # whole values first: the patterns below would split them
        text = text.replace(value, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    return _PARAM.sub(rf"\1{MASK}", text)
