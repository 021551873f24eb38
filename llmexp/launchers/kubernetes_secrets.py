"""How secrets reach a Kubernetes job's pods, written into no manifest, file or output.

A secret typed on the command line lives in the launching process's environment
(``LLMEXP_SECRET_<n>``, see ``configuration.secrets``) and the job's overrides read it back
through ``${oc.env:LLMEXP_SECRET_<n>}``; local ranks and Slurm jobs inherit that environment,
pods do not. So a sweep whose overrides hold such references gets one Secret of its own
(``llmexp-<sweep id>-secrets``, type Opaque, labelled with the sweep), created through the API
before its jobs, and each job's container takes the variables its own overrides reference
from it (``valueFrom.secretKeyRef``): manifests, jobs.json and the dry run carry names only.
The launcher deletes the Secret once every job using it has ended (as do ``llmexp cancel``,
and ``llmexp gather`` when it sees the last of them end).

A profile's ``secret_env`` maps further variables to Secrets the cluster's admin made
(``WANDB_API_KEY: wandb/api-key``: Secret ``wandb``, key ``api-key``), checked before
anything is submitted (``secret_env_problem``).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional

from llmexp.configuration.secrets import ENV_PREFIX
from llmexp.errors import UserError

# ${oc.env:LLMEXP_SECRET_<n>}, also as a sweep's job overrides write it (Hydra escapes $, {, } and :)
REFERENCE = re.compile(r"\$\\?\{oc\.env\\?:(" + re.escape(ENV_PREFIX) + r"\d+)\\?\}")
# Kubernetes' own rules: a Secret's name is a DNS-1123 subdomain, its keys [-._a-zA-Z0-9]+
SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def sweep_secret_name(sweep_id: str) -> str:
    """The Secret holding a sweep's command-line secrets."""
    return f"llmexp-{sweep_id}-secrets"


def referenced(arguments: Iterable[str]) -> List[str]:
    """The ``LLMEXP_SECRET_<n>`` variables ``arguments`` read, in order of their number."""
    found = {name for argument in arguments for name in REFERENCE.findall(argument)}
    return sorted(found, key=lambda name: int(name[len(ENV_PREFIX):]))


def secret_env_problem(cluster) -> Optional[str]:
    """Why ``cluster.secret_env`` cannot be rendered (one paragraph naming the field and the fix), else None."""
    for env, reference in cluster.secret_env.items():
        field = f"cluster.secret_env.{env}"
        name, _, key = str(reference).partition("/")
        if not ENV_NAME.fullmatch(env) or env.startswith(ENV_PREFIX) or env in cluster.env:
            why = ("is set by cluster.env too" if env in cluster.env else
                   f"is llmexp's own ({ENV_PREFIX}<n>: secrets typed on the command line)"
                   if env.startswith(ENV_PREFIX) else "is not an environment variable name")
            return f"{field}: {env} {why}; map another variable name to the Secret in cluster={cluster.name}."
        if not (SECRET_NAME.fullmatch(name) and len(name) <= 253 and SECRET_KEY.fullmatch(key) and len(key) <= 253):
            return (f"{field}={reference} is not <secret name>/<key>: it names the key of a Secret in namespace "
                    f"{cluster.namespace} (the name lowercase letters, digits, '-' and '.'; the key letters, digits, "
                    f"'-', '_' and '.'), e.g. {field}=wandb/api-key for a Secret made with `kubectl -n "
                    f"{cluster.namespace} create secret generic wandb --from-literal=api-key=<value>`.")
    return None


def secret_env(cluster, arguments: List[str], secret: Optional[str]) -> List[Dict[str, Any]]:
    """The container's variables that come from Secrets: the profile's ``secret_env``, then the
    ``LLMEXP_SECRET_<n>`` that ``arguments`` reference, from the sweep's Secret ``secret``."""
    if problem := secret_env_problem(cluster):
        raise UserError(problem)
    mapped = [(env, *str(reference).split("/", 1)) for env, reference in cluster.secret_env.items()]
    keys = referenced(arguments)
    if keys and secret is None:
        raise ValueError(f"the job's overrides read {', '.join(keys)}, but no Secret of the sweep holds them.")
    mapped += [(key, secret, key) for key in keys]
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}} for env, name, key in mapped]


def sweep_secret(name: str, namespace: str, labels: Dict[str, str], keys: Iterable[str],
                 environ: Mapping[str, str]) -> Dict[str, Any]:
    """The sweep's Secret (core/v1), holding each of ``keys`` with its value in ``environ``; never printed or saved."""
    missing = [key for key in keys if key not in environ]
    if missing:
        raise UserError(f"the overrides read {', '.join(missing)}, which this process's environment lacks: type the "
                        "secret on the command line (llmexp moves it there), or give the variable a value.")
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "stringData": {key: environ[key] for key in keys}}
