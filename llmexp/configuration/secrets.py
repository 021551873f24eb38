"""Secrets: which values are secret, and how one typed on the command line stays off disk.

A value is secret when its key's last word names a credential (``api_key``, ``token``,
``password``, ``secret`` ...; see ``is_secret_key``), or when it is the ``user:password``
part of a URL. Config snapshots (results.json, .hydra/config.yaml, a tracker's config)
replace such values by ``<redacted>`` (``llmexp.results.record.redact_secrets``).

A secret given as an override must also stay out of what Hydra, the trackers and the
console record of the command line itself: Hydra's ``hydra.yaml`` (task overrides,
``override_dirname``), a multirun's ``multirun.yaml`` and ``#0 : ...`` log lines, wandb's
recorded arguments, error messages. ``secrets_to_environment`` rewrites the command line
once, before Hydra sees it: each secret value moves into an environment variable of this
process (``LLMEXP_SECRET_<n>``), and the override reads it back through OmegaConf's
``${oc.env:...}``. Every record then holds the interpolation, while the job, which
resolves its config, gets the real value; child processes (joblib workers, torch
distributed ranks, Slurm jobs, which sbatch starts with the submitting environment)
inherit the variable; a Kubernetes sweep's pods read it from a Secret of the sweep
(``llmexp.launchers.kubernetes_secrets``).
"""

from __future__ import annotations

import os
import re
from typing import Any, List, MutableMapping, Optional, Sequence, Tuple
from urllib.parse import unquote, urlsplit, urlunsplit

from llmexp.errors import UserError

REDACTED = "<redacted>"
ENV_PREFIX = "LLMEXP_SECRET_"

# A key is secret when its last word is one of these (any case; camelCase is split):
# `hf_token`, `WANDB_API_KEY`, `clientSecret` are; `max_tokens`, `tokenizer`, `secret_sauce` are not.
_SECRET_KEY = re.compile(
    r"(?:^|[^a-z0-9])(?:api_?key|token|auth_?token|access_?token|secret|secret_?key|client_?secret|"
    r"password|passwd|passphrase|access_?key|private_?key|credentials?|authorization|cookie)$"
)
# Tokenizer settings name tokens, not credentials.
_SPECIAL_TOKEN_KEY = re.compile(r"(?:^|_)(?:bos|eos|pad|unk|sep|cls|mask)_token$")
# user:password in a URL (an mlflow or database URI, a judge endpoint): https://user:pw@host
_URL_CREDENTIALS = re.compile(r"(?<=://)([^/@\s]+:[^/@\s]*)@")


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential (``hf_token``, ``clientSecret``; not ``pad_token``)."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()  # clientSecret -> client_secret
    return bool(_SECRET_KEY.search(words)) and not _SPECIAL_TOKEN_KEY.search(words)


def redact_url_credentials(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://<redacted>@host``, wherever it appears in ``text``."""
    return _URL_CREDENTIALS.sub(REDACTED + "@", text)


def split_url_credentials(url: str) -> Tuple[str, Optional[Tuple[str, str]]]:
    """(``url`` without its ``user:password@``, (user, password) decoded, or None when it had none).

    A client sends the pair as HTTP Basic authentication and shows, logs and stores only the
    URL without it: httpx logs each request's URL, userinfo included, at INFO.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def secrets_to_environment(
    overrides: Sequence[str], environ: Optional[MutableMapping[str, str]] = None
) -> List[str]:
    """The command line with every secret value moved into ``environ`` (default: ``os.environ``).

    ``tracker.api_key=sk-1`` becomes ``tracker.api_key=${oc.env:LLMEXP_SECRET_0}`` with
    ``LLMEXP_SECRET_0=sk-1`` set, each value of a sweep (``api_key=a,b``) in its own
    variable; ``uri=https://u:pw@host`` becomes ``uri=https://${oc.env:LLMEXP_SECRET_1}@host``,
    also inside list and dict values. Options (``-m``, ``--cfg``), values that are already
    interpolations and unset values are left as they are, so rewriting twice changes nothing.
    """
    environ = os.environ if environ is None else environ
    return [_hide(argument, environ) for argument in overrides]


def _hide(argument: str, environ: MutableMapping[str, str]) -> str:
    head, sep, value = argument.partition("=")
    if argument.startswith("-") or not sep or not value:
        return argument
    key = head.lstrip("+~").split("@", 1)[0]
    if is_secret_key(key.rsplit(".", 1)[-1]) and not head.startswith("~"):
        return f"{head}={_hide_value(head, value, environ)}"
    return head + sep + _URL_CREDENTIALS.sub(lambda match: _hide_credentials(match, environ), value)


def _hide_value(head: str, value: str, environ: MutableMapping[str, str]) -> str:
    """A secret key's value (one value or a sweep of them) as ``${oc.env:...}`` interpolations."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_override(f"{head}={value}").value()
    except (HydraException, RecursionError):  # the parser recurses once per level of brackets
        raise UserError(
            f"`{head}={REDACTED}` is not a valid override. Quote a value holding spaces or special characters "
            f"({head}='...'), or export it and give {head}='${{oc.env:NAME}}'."
        ) from None
    values = parsed.list if isinstance(parsed, ChoiceSweep) else [parsed]
    if any(not _is_plain(item) for item in values):
        raise UserError(
            f"`{head}={REDACTED}`: a secret takes one value (or a comma-separated sweep of values) on the "
            f"command line, not a list, dict or range. Export it and give {head}='${{oc.env:NAME}}'."
        )
    if len(values) == 1 and not _is_secret_value(values[0]):
        return value
    hidden = (_interpolation(str(item), environ) if _is_secret_value(item) else _as_typed(item) for item in values)
    return ",".join(hidden)


def _hide_credentials(match: "re.Match[str]", environ: MutableMapping[str, str]) -> str:
    credentials = match.group(1)
    if "${" in credentials or "$\\{" in credentials:  # already an interpolation (escaped: as a sweep's job has it)
        return match.group(0)
    return _interpolation(credentials, environ) + "@"


def _interpolation(secret: str, environ: MutableMapping[str, str]) -> str:
    """``${oc.env:LLMEXP_SECRET_<n>}`` for ``secret``: the first variable free or already holding it."""
    number = 0
    while environ.get(f"{ENV_PREFIX}{number}", secret) != secret:
        number += 1
    environ[f"{ENV_PREFIX}{number}"] = secret
    return f"${{oc.env:{ENV_PREFIX}{number}}}"


def _as_typed(value: Any) -> str:
    """A value that is not hidden, as it was typed: null, a flag, '' or an interpolation."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return value or "''"


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_secret_value(value: Any) -> bool:
    """A value worth hiding: not unset, not a flag, not already an interpolation."""
    if value is None or isinstance(value, bool) or value == "":
        return False
    return not (isinstance(value, str) and value.startswith("${") and value.endswith("}"))
