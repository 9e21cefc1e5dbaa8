"""Filesystems behind URIs: local paths, s3:// (and S3-compatible stores), gs://, abfs:// and az://.

S3 goes through pyarrow's S3 filesystem: the AWS SDK's credential chain (environment,
profile, instance role), its retries with backoff for throttling, 5xx and dropped
connections, and multipart uploads for writes. Secrets are kept out of error messages.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any

from docpipe.config import StorageOptions

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else "file"


def is_remote(uri: str) -> bool:
    return scheme_of(uri) in REMOTE_SCHEMES


def strip_scheme(uri: str) -> str:
    return _SCHEME.sub("", uri, count=1)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(uri: str, storage: StorageOptions | None = None):
    """(pyarrow filesystem, path within it) for a URI or a local path."""
    scheme = scheme_of(uri)
    storage = storage or StorageOptions()
    if scheme == "file":
        from pyarrow.fs import LocalFileSystem

        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return LocalFileSystem(), os.path.abspath(path)
    return _remote_fs(scheme, _storage_key(storage)), strip_scheme(uri)


def _storage_key(storage: StorageOptions) -> tuple:
    # lru_cache needs hashable arguments; secrets stay inside SecretStr until the filesystem is built.
    return tuple(sorted((k, v) for k, v in storage.__dict__.items()))


@lru_cache(maxsize=16)
def _remote_fs(scheme: str, key: tuple):
    storage = StorageOptions(**{k: v for k, v in key})
    if scheme in ("s3", "s3a"):
        return s3_filesystem(storage)
    if scheme in ("gs", "gcs"):
        from pyarrow.fs import GcsFileSystem

        return GcsFileSystem(retry_time_limit=storage.retry_time_limit_s)
    # Azure through fsspec (adlfs), when the user has installed it.
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fsspec.filesystem(scheme)))


def s3_settings(storage: StorageOptions) -> dict[str, Any]:
    """Explicit settings first, then the AWS environment conventions (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL,
    AWS_REGION, AWS_DEFAULT_REGION). Credentials left unset fall to the SDK's chain."""
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    settings: dict[str, Any] = {"region": region, "anonymous": storage.anonymous}
    if endpoint:
        m = re.match(r"^(https?)://(.+?)/?$", endpoint)
        settings["scheme"], settings["endpoint_override"] = (m.group(1), m.group(2)) if m else ("https", endpoint)
    for field, name in (("access_key_id", "access_key"), ("secret_access_key", "secret_key"),
                        ("session_token", "session_token")):
        secret = getattr(storage, field)
        if secret is not None:
            settings[name] = secret.get_secret_value()
    return settings


def s3_filesystem(storage: StorageOptions):
    from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

    return S3FileSystem(
        **s3_settings(storage),
        retry_strategy=AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts),
        connect_timeout=storage.connect_timeout_s,
        request_timeout=storage.request_timeout_s,
    )


def read_bytes(uri: str, storage: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, storage)
    with fs.open_input_file(path) as f:
        return f.read()


_AUTH_ERRORS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "AccessDenied")


def explain(message: str) -> str:
    """Add what to check when the store refused the request's credentials."""
    if any(code in message for code in _AUTH_ERRORS):
        return message + " (check the credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the role)"
    return message


def glob_to_regex(pattern: str) -> re.Pattern:
    """Shell-style: '*' and '?' stay within one path segment, '**' crosses them."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


# Values that must never appear in an error message, a log line or a run manifest.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS_JSON",
               "AZURE_STORAGE_KEY", "AZURE_CLIENT_SECRET", "AZURE_STORAGE_SAS_TOKEN", "DOCPIPE_PDF_PASSWORD")
_registered: set[str] = set()


def register_secrets(storage: StorageOptions) -> None:
    for field in ("access_key_id", "secret_access_key", "session_token"):
        secret = getattr(storage, field)
        if secret is not None and len(secret.get_secret_value()) >= 4:
            _registered.add(secret.get_secret_value())


def register_secret(value: str) -> None:
    """One more value (a PDF password, say) that redact() blanks out in this process."""
    if len(value) >= 4:  # shorter ones would blank out ordinary text; they are kept out of messages by their callers
        _registered.add(value)


def redact(text: str) -> str:
    secrets = set(_registered)
    secrets.update(v for k in _SECRET_ENV if len(v := os.environ.get(k, "")) >= 4)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
