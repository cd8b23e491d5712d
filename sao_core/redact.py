"""What an error, log line or report may show of a URL: never its credentials.

    redact("s3://AKIA:s3cr3t@bucket/x?X-Amz-Signature=abc")   # "s3://***@bucket/x?X-Amz-Signature=***"
    url_credentials("http://user:pw@host/v1")                  # "user-info (user:password@)"
    error_line(exc)                                            # redacted, on one line

A URL's user-info (`user:password@`) and the values of its query parameters are replaced by `***`
wherever a URL appears in the text: a presigned or SAS URL carries its signature in the query, and a
query value is rarely worth showing in an error. Also a bearer token after "Bearer". Configs refuse
credentials in URLs outright (sao_core.config.sections), so these are the second line: what reaches an
error message, a log, a Prefect state or the command line passes through here first (SECURITY.md).
"""

from __future__ import annotations

import re

MASK = "***"

# A URL inside free text: scheme://, then everything up to whitespace or a quote (masking a bracket too
# much is harmless; missing an IPv6 host's query is not).
_URL = re.compile(r"""(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s'"<>`]+)""")
# User-info: everything before the last "@" of the authority (the part before the first "/").
_USERINFO = re.compile(r"^(?P<info>[^/?#]*)@")
_QUERY_VALUE = re.compile(r"(?P<name>[?&;][^=&;#?]+=)(?P<value>[^&;#]*)")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s'\"]+")
# Query parameters that carry a credential (AWS, GCS and Azure presigned URLs, API tokens).
_CREDENTIAL_PARAM = re.compile(
    r"(?i)(token|key|secret|passw|pwd|sig|credential|auth|session|code|access|private)"
)


def _redact_url(match: re.Match[str]) -> str:
    rest = _USERINFO.sub(MASK + "@", match.group("rest"), count=1)
    rest = _QUERY_VALUE.sub(lambda m: m.group("name") + MASK if m.group("value") else m.group(0), rest)
    return match.group("scheme") + rest


def redact(text: str) -> str:
    """`text` with every URL's user-info and query values, and any bearer token, replaced by ***."""
    return _BEARER.sub(r"\1" + MASK, _URL.sub(_redact_url, text))


def url_credentials(value: str) -> str | None:
    """What credential a config value's URL carries ("user-info", "query parameter 'token'"), or None.

    Every link of a chained URL (simplecache::s3://...) is looked at."""
    for match in _URL.finditer(value):
        rest = match.group("rest")
        if _USERINFO.match(rest):
            return "user-info (user:password@)"
        for param in _QUERY_VALUE.finditer(rest):
            name = param.group("name")[1:-1]
            if _CREDENTIAL_PARAM.search(name):
                return f"query parameter {name!r}"
    return None


def error_line(error: BaseException | str) -> str:
    """An error as one redacted line: what the command line and a failed run's state show."""
    text = error if isinstance(error, str) else str(error)
    return " ".join(redact(text).split())
