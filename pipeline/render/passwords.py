"""PDF passwords: the run's own (--password, DOCPIPE_PDF_PASSWORD, a secret file) and per-file ones from a mapping
file (--passwords: path or glob -> password). Read once on the driver; the render stage asks for a document's
candidates by its URI. Every value is registered as a secret, so no message, log line or manifest shows it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pydantic import SecretStr

from docpipe.config import RunConfig
from docpipe.errors import ConfigError, describe
from docpipe.storage import glob_to_regex, read_bytes, register_secret

ENV = "DOCPIPE_PDF_PASSWORD"


@dataclass(frozen=True)
class Passwords:
    """What to try on an encrypted PDF. Values stay in SecretStr, so a repr or a pickled task shows no password."""

    run: SecretStr | None = None
    by_path: tuple[tuple[str, SecretStr], ...] = field(default=())  # (path or glob, password), in the file's order

    def candidates(self, uri: str) -> list[tuple[str, str]]:
        """(where it came from, password) to try on ``uri``, most specific first: its matches in the mapping file,
        then the run's password."""
        name = uri.rsplit("/", 1)[-1]
        found = [(f"--passwords {key!r}", secret.get_secret_value()) for key, secret in self.by_path
                 if (glob_to_regex(key).search(uri) if "/" in key else glob_to_regex(key).match(name))]
        if self.run is not None:
            found.append(("the run's password", self.run.get_secret_value()))
        return found

    def register(self) -> None:
        """Mark every password as a secret in this process (a Ray worker's too), for storage.redact."""
        for secret in [self.run, *(s for _, s in self.by_path)]:
            if secret is not None:
                register_secret(secret.get_secret_value())


def load_passwords(config: RunConfig) -> Passwords | None:
    """The run's passwords, read on the driver (the files and the environment variable are the driver's), or None."""
    run = config.password
    if run is None and config.password_file:
        try:
            lines = read_bytes(config.password_file, config.storage).decode("utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read password_file {config.password_file}: {describe(exc)}") from None
        if not lines or not lines[0]:
            raise ConfigError(f"password_file {config.password_file} is empty")
        run = SecretStr(lines[0])
    if run is None and os.environ.get(ENV):
        run = SecretStr(os.environ[ENV])
    by_path = _mapping(config) if config.passwords else ()
    if run is None and not by_path:
        return None
    passwords = Passwords(run, by_path)
    passwords.register()
    return passwords


def _mapping(config: RunConfig) -> tuple[tuple[str, SecretStr], ...]:
    import json

    import yaml

    path = config.passwords
    try:
        text = read_bytes(path, config.storage).decode("utf-8-sig")
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        # The parser's message can quote the file's lines, passwords included: name the error's type alone.
        raise ConfigError(f"cannot read passwords file {path}: {type(exc).__name__}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"passwords file {path} must map paths or globs to passwords, e.g. '*.pdf: secret'")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, (str, int)) or v == ""]
    if bad:
        raise ConfigError(f"passwords file {path}: entries need a path or glob and a password; not so: "
                          + ", ".join(repr(k) for k in bad[:5]))
    return tuple((key, SecretStr(str(value))) for key, value in data.items())
