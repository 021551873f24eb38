"""``llmexp serve MODEL_DIR``: an OpenAI-compatible HTTP server for a model the framework produced.

Serves ``/v1/completions``, ``/v1/chat/completions`` (streaming or not), ``/v1/models``,
``/health`` and ``/metrics`` (Prometheus) from one in-process engine that batches requests
continuously (``llmexp.serving.engine``); LoRA adapters given with ``--adapter`` are served
on the same base, each under its name. Binds 127.0.0.1 unless told otherwise; Ctrl-C stops.
``--backend vllm`` instead becomes vLLM's own OpenAI server on CUDA GPUs (``llmexp.serving.vllm_server``).
``--draft-model DIR`` (a smaller model with the same tokenizer, e.g. the compress pipeline's distilled
student ``<run>/distill``) decodes speculatively, ``--num-speculative-tokens`` proposed per round, on
either backend (``llmexp.serving.speculative``; vLLM's ``speculative_config``).

API keys (``LLMEXP_API_KEY``, ``--api-key-file``; ``llmexp.serving.auth``) make every path but
``/health`` ask for ``Authorization: Bearer <key>``. An address other machines can reach is
refused without a key, unless ``--allow-unauthenticated-remote`` says that is meant.

``retriever=bm25 retriever.documents=DIR`` (any key of the ``retriever`` group, and ``data=...`` whose documents a
retriever without ``documents`` reads) attaches a retriever: each question is answered with the passages it
retrieves in front of it, and the response lists them as ``sources`` (``llmexp.serving.retrieval_augmented``). The
index is built once and cached in ``--index-dir``.

``--rails DIR`` (a rails config directory in NeMo Guardrails' layout; ``default``: the shipped one) checks each
request's input and each answer, and answers a blocked request with a refusal that names the rail
(``llmexp.serving.guarded``).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Dict, List, NoReturn, Optional, Sequence

from llmexp.machine import cpu_threads
from llmexp.machine.backends import SERVE_EXTRA_INSTALL, SERVE_EXTRA_MODULES, importable
from llmexp.display import console
from llmexp.errors import EXIT_USER_ERROR, UserError
from llmexp.serving.auth import ENV_VAR as API_KEY_VAR
from llmexp.serving.auth import NEW_KEY_HINT, read_api_keys
from llmexp.serving.served_models import DEFAULT_SPECULATIVE_TOKENS, check_served_files

BACKENDS = ("inprocess", "vllm")
INPROCESS_DEFAULTS = {"max_batch_size": 16, "max_queue": 64}
# options only one backend has: the backend, and what to do instead on the other one
BACKEND_ONLY_OPTIONS = {
    "max_queue": ("inprocess", "vLLM queues every request it accepts; drop --max-queue."),
    "max_tokens_limit": ("inprocess", "With vLLM, bound prompt plus generated tokens with --max-model-len."),
    "max_body_bytes": ("inprocess", "vLLM reads request bodies of any size; put a proxy that bounds them (nginx's "
                       "client_max_body_size) in front of it."),
    "tensor_parallel_size": ("vllm", "The in-process engine runs one copy of the model on this process's device."),
    "gpu_memory_utilization": ("vllm", "The in-process engine allocates as it generates, with no memory budget."),
    "max_model_len": ("vllm", "In process, bound max_tokens with --max-tokens-limit."),
    "device": ("inprocess", "vLLM places the model on the GPUs itself (--tensor-parallel-size)."),
}


def main(argv: List[str]) -> int:
    refuse_without_web_stack()
    args = parse_args(argv)
    _check_numbers(args)
    _check_backend_options(args)
    adapters = _parse_adapters(args.adapter)
    retrieval_config = _retrieval_config(args)
    rails = _rails(args)
    api_keys = _api_keys(args)
    if args.backend == "vllm":
        _serve_with_vllm(args, adapters, api_keys)
    for option, default in INPROCESS_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    # the engine steps the model in a worker thread while the event loop and clients need the cores between
    # its steps: spinning OpenMP threads made a 64-token generation 8x slower on 2 cores (bench_generation.py)
    cpu_threads.prefer_passive_waiting()
    check_served_files(args.model_dir, adapters, args.draft_model)  # a damaged file is reported, whatever the port
    # the index is built (or found) before binding: a documents problem stops the command before it serves
    retrieval = _attach_retriever(retrieval_config, args.index_dir)
    listener = _bind(args.host, args.port)

    # the server itself (uvicorn, the app, the engine: torch and transformers) is imported once the input
    # checks passed and the port is bound, so bad input is refused at once
    import uvicorn

    from llmexp.display.library_noise import quiet_libraries
    from llmexp.serving.app import create_app
    from llmexp.serving.engine import Engine
    from llmexp.serving.served_models import load_served_models

    quiet_libraries()
    served = load_served_models(args.model_dir, adapters=adapters, name=args.name, draft_dir=args.draft_model,
                                num_speculative_tokens=args.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS)
    device = _device(args.device)
    served.model.to(device)
    if served.draft is not None:
        served.draft.model.to(device)
    engine = Engine(served, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    host, port = listener.getsockname()[:2]
    names = ", ".join([f"{served.base_name} (base)", *(f"{name} (adapter)" for name in served.adapter_dirs)])
    if served.draft is not None:
        names += f"  draft: {served.draft.directory} ({served.draft.num_speculative_tokens} tokens per round)"

    access = f"API keys: {len(api_keys)}" if api_keys else "no API key"
    if retrieval is not None:
        access += f"  retriever: {retrieval_config.retriever.name} top_k {retrieval.top_k}, index {args.index_dir}"
    if rails is not None:
        access += f"  rails: {rails.spec.directory}"

    def announce() -> None:
        print(f"llmexp serve: http://{_url_host(host)}:{port}/v1  models: {names}  {access}  (Ctrl-C stops)",
              flush=True)

    app = create_app(engine, max_tokens_limit=args.max_tokens_limit, on_ready=announce, api_keys=api_keys,
                     max_body_bytes=args.max_body_bytes, retrieval=retrieval, rails=rails)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        # uvicorn turns Ctrl-C (SIGINT) and SIGTERM into a graceful shutdown, then re-raises the signal
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
        if retrieval is not None:
            retrieval.close()
        listener.close()
    print("llmexp serve: stopped", flush=True)
    return 0


def refuse_without_web_stack() -> None:
    """Stop before anything else when the `serve` extra (the HTTP server's packages) is not installed."""
    missing = [module for module in SERVE_EXTRA_MODULES if not importable(module)]
    if missing:
        raise UserError(
            f"llmexp serve needs the HTTP server's packages, which the base install leaves out: "
            f"{', '.join(missing)} cannot be imported here. Install them with `{SERVE_EXTRA_INSTALL}` "
            "(or `pip install -e '.[serve]'` in a checkout), then run the same command again."
        )


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The options, ``backend=X`` included; in-process-only options left None when not given (see ``main``)."""
    parser = argparse.ArgumentParser(prog="llmexp serve", description=__doc__.split("\n", 1)[0])
    parser.add_argument("model_dir", type=Path, help="a checkpoint directory (save_pretrained, ModelOpt-quantized "
                        "too), a run's stage directory holding model/ (or a quantize stage's export/ for vLLM), "
                        "or a LoRA adapter directory")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve the PEFT LoRA adapter in DIR on the base model as NAME (repeatable)")
    parser.add_argument("--name", help="the base model's served name (default: its directory's name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only); one that other machines can "
                        "reach needs API keys or --allow-unauthenticated-remote")
    parser.add_argument("--port", type=int, default=8000, help="port to bind, 0 for any free one (default: %(default)s)")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                        help=f"require one of the API keys in FILE (one per line), as well as those in ${API_KEY_VAR} "
                        "(comma-separated); clients send `Authorization: Bearer <key>`")
    parser.add_argument("--allow-unauthenticated-remote", action="store_true",
                        help="serve an address other machines can reach without API keys (a trusted network only)")
    parser.add_argument("--api-key", help=argparse.SUPPRESS)  # refused with the way that keeps the key secret
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="rows decoded together (in process: 16; vLLM: its --max-num-seqs, default its own)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="in process: requests that may wait for a batch slot; beyond, HTTP 429 (default: 64)")
    parser.add_argument("--max-tokens-limit", type=int, default=None,
                        help="in process: the largest max_tokens a request may ask for (default: the model's context)")
    parser.add_argument("--max-body-bytes", type=int, default=None, metavar="BYTES",
                        help="in process: the largest request body taken; beyond, HTTP 413 (default: 64 bytes per "
                        "token of the model's context, at least 1 MiB)")
    parser.add_argument("--draft-model", type=Path, default=None, metavar="DIR",
                        help="decode speculatively with this smaller model as the draft: a checkpoint or a run's stage "
                        "directory with the served model's tokenizer (e.g. a compress run's distill stage)")
    parser.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                        help=f"with --draft-model: tokens it proposes per round (default: {DEFAULT_SPECULATIVE_TOKENS})")
    parser.add_argument("--backend", choices=BACKENDS, default="inprocess",
                        help="what generates: the in-process continuous-batching engine (default; CPU or one GPU) "
                        "or vLLM's OpenAI server (CUDA GPUs, vLLM installed); backend=vllm works too")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="in process: where the model runs (default: auto, the GPU when there is one)")
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="vLLM: GPUs one model is split over (default: 1)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vLLM: the fraction of each GPU's memory it may use (default: vLLM's, 0.9)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="vLLM: the most tokens (prompt plus generated) per sequence (default: the model's)")
    parser.add_argument("--rails", default=None, metavar="DIR",
                        help="in process: check requests and answers with the rails of DIR (NeMo Guardrails' layout: "
                        "config.yml, prompts.yml), or `default` for the shipped ones")
    parser.add_argument("--index-dir", type=Path, default=None, metavar="DIR",
                        help="with a retriever: where its index is built once and reused while the documents and "
                        "retriever settings stay the same (default: under ${LLMEXP_CACHE_DIR:-~/.cache/llmexp}/indexes/)")
    parser.add_argument("config_overrides", nargs="*", default=[], metavar="retriever=KIND retriever.KEY=VALUE",
                        help="a retriever and its settings, as in llmexp's other commands (retriever=bm25, "
                        "retriever.documents=DIR, retriever.top_k=5, retriever.chunk_words=128, ...; data=... for "
                        "the documents of a data option when retriever.documents is not set)")
    args, unknown = parser.parse_known_args(hydra_style_options(argv))
    stray = [word for word in unknown if word.split("=", 1)[0].split(".", 1)[0] in CONFIG_GROUPS]
    if len(stray) != len(unknown):
        parser.error(f"unrecognized arguments: {' '.join(word for word in unknown if word not in stray)}")
    args.config_overrides += stray  # a group's override given after an option, e.g. --port 0 retriever=bm25
    return args


# options that may also be typed like llmexp's other overrides, bare or under serve.: serve.draft_model=DIR
HYDRA_STYLE_OPTIONS = ("backend", "draft_model", "num_speculative_tokens")


def hydra_style_options(argv: List[str]) -> List[str]:
    """``backend=X``, ``serve.draft_model=DIR``, ... as ``--backend X``, ``--draft-model DIR`` (not when the word is
    an option's value)."""
    words: List[str] = []
    for arg in argv:
        previous = words[-1] if words else ""
        awaited = previous.startswith("-") and "=" not in previous and previous not in ("-h", "--help")
        key, sep, value = arg.partition("=")
        key = key[len("serve."):] if key.startswith("serve.") else key
        if sep and key in HYDRA_STYLE_OPTIONS and not awaited:
            words += ["--" + key.replace("_", "-"), value]
        else:
            words.append(arg)
    return words


# the config groups serve composes, with llmexp's config, from KEY=VALUE words: what a retriever reads
CONFIG_GROUPS = ("retriever", "data")


def _retrieval_config(args: argparse.Namespace):
    """The run config composed from the retriever overrides (None without any): a key no retriever option has
    stops the command here."""
    if not args.config_overrides:
        if args.index_dir is not None:
            raise UserError(f"--index-dir {args.index_dir}: it holds a retriever's index, and no retriever is given. "
                            "Add retriever=bm25 retriever.documents=DIR (or dense, hybrid), or drop --index-dir.")
        return None
    for word in args.config_overrides:
        if word.split("=", 1)[0].split(".", 1)[0] not in CONFIG_GROUPS or "=" not in word:
            raise UserError(f"{word}: llmexp serve takes KEY=VALUE overrides of the retriever (retriever=bm25, "
                            "retriever.documents=DIR, retriever.top_k=5, ...) and data=... only; the model is "
                            "MODEL_DIR, given once, and its other settings are options (llmexp serve --help).")
    if args.backend != "inprocess":
        raise UserError(f"{args.config_overrides[0]}: a retriever is served by the in-process engine only, and this "
                        f"serve uses --backend {args.backend}. Drop --backend {args.backend}, or the retriever.")
    from llmexp.configuration.compose import compose_config

    cfg = compose_config(args.config_overrides)
    name = cfg.retriever.name
    if name == "none":
        raise UserError(f"{' '.join(args.config_overrides)}: these settings are for a retriever, and none is chosen "
                        "(retriever=none). Add retriever=bm25 (or dense, hybrid), or drop them.")
    if args.index_dir is None:
        args.index_dir = _default_index_dir(cfg)
    return cfg


def _default_index_dir(cfg) -> Path:
    """A directory per retriever setting and documents path under the cache, so switching between two sets of
    documents keeps both indexes."""
    from omegaconf import OmegaConf

    documents = cfg.retriever.documents
    what = {"retriever": OmegaConf.to_container(cfg.retriever),
            "documents": str(Path(documents).expanduser().resolve()) if documents else None,
            "data": None if documents else OmegaConf.to_container(cfg.data)}
    fingerprint = hashlib.sha256(repr(sorted(what.items())).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LLMEXP_CACHE_DIR") or Path.home() / ".cache" / "llmexp").expanduser()
    return root / "indexes" / f"{cfg.retriever.name}-{fingerprint}"


def _attach_retriever(cfg, index_dir: Optional[Path]):
    """The retriever of ``cfg`` with its index built (or reused from ``index_dir``), ready for requests; None
    without one."""
    if cfg is None:
        return None
    from llmexp.retrieval import build_retriever
    from llmexp.serving.retrieval_augmented import RetrievalAugmentation

    return RetrievalAugmentation(build_retriever(cfg, index_dir), cfg.retriever.top_k)


def _rails(args: argparse.Namespace):
    """``--rails``: its config directory read and checked before the model loads; None without it."""
    if args.rails is None:
        return None
    if args.backend != "inprocess":
        raise UserError(f"--rails {args.rails}: rails guard the in-process engine only, and this serve uses "
                        f"--backend {args.backend}. Drop --backend {args.backend}, or --rails.")
    from llmexp.rails import Rails, load_rails_config, resolve_config_dir

    return Rails(load_rails_config(resolve_config_dir(args.rails)))


def _serve_with_vllm(args: argparse.Namespace, adapters: Dict[str, Path], api_keys: Sequence[str]) -> NoReturn:
    """Check the input, then the machine (vLLM installed, CUDA GPUs), then become vLLM's server, the key (if any)
    handed over in its environment as ``VLLM_API_KEY``, never on its command line."""
    from llmexp.serving import vllm_server

    environment = vllm_server.vllm_environment(os.environ, api_keys)
    listener = _bind(args.host, args.port)  # a busy port fails now, not after vLLM loaded the model
    port = listener.getsockname()[1]
    listener.close()
    command = vllm_server.vllm_command(
        args.model_dir, adapters=adapters, name=args.name, host=args.host, port=port,
        max_num_seqs=args.max_batch_size, tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        draft_dir=args.draft_model, num_speculative_tokens=args.num_speculative_tokens,
    )
    vllm_server.require_vllm()
    vllm_server.require_cuda(args.tensor_parallel_size)
    vllm_server.exec_vllm(command, f"http://{_url_host(args.host)}:{port}/v1", environment)


def _api_keys(args: argparse.Namespace) -> List[str]:
    """The keys from the environment and ``--api-key-file``, after checking that the address may be served with
    them: one other machines can reach needs a key (vLLM's own ``VLLM_API_KEY`` counts for ``--backend vllm``),
    unless ``--allow-unauthenticated-remote``."""
    if args.api_key is not None:
        raise UserError(
            f"--api-key: llmexp serve does not take keys on the command line, where shell history and process lists "
            f"keep them. Put the key in the environment (export {API_KEY_VAR}=<key>; several: comma-separated) or in "
            "a file given with --api-key-file FILE (one key per line), and remove this one from your shell history."
        )
    keys = read_api_keys(os.environ, args.api_key_file)
    guarded = bool(keys) or (args.backend == "vllm" and bool(os.environ.get("VLLM_API_KEY")))
    if not guarded and not args.allow_unauthenticated_remote and not _is_loopback(args.host):
        raise UserError(
            f"--host {args.host}: other machines can reach this address, and no API key is set, so anyone who "
            f"reaches the port could generate with this model. Set keys (export {API_KEY_VAR}=<key>, e.g. from "
            f"{NEW_KEY_HINT}, or --api-key-file FILE), or bind --host 127.0.0.1, or, on a network you trust, add "
            "--allow-unauthenticated-remote."
        )
    return keys


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) means this machine only; a name counts only if every address
    it resolves to is a loopback one."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def _device(choice):
    """``--device``: auto takes the GPU when torch sees one; cuda without one is refused."""
    import torch

    if choice == "cpu" or (choice in (None, "auto") and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu (or auto).")
    return torch.device("cuda")


def _check_numbers(args: argparse.Namespace) -> None:
    for option, value, least in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 0),
                                 ("--port", args.port, 0), ("--max-tokens-limit", args.max_tokens_limit, 1),
                                 ("--max-body-bytes", args.max_body_bytes, 1),
                                 ("--tensor-parallel-size", args.tensor_parallel_size, 1),
                                 ("--max-model-len", args.max_model_len, 1),
                                 ("--num-speculative-tokens", args.num_speculative_tokens, 1)):
        if value is not None and value < least:
            raise UserError(f"{option}={value}: give a whole number of at least {least}.")
    if args.num_speculative_tokens is not None and args.draft_model is None:
        raise UserError(f"--num-speculative-tokens={args.num_speculative_tokens}: it sets what a draft model proposes, "
                        "and none is given. Add --draft-model DIR (a smaller model with this one's tokenizer, e.g. "
                        "<run>/distill), or drop --num-speculative-tokens.")
    if args.port > 65535:
        raise UserError(f"--port={args.port}: give a port from 0 to 65535.")
    fraction = args.gpu_memory_utilization
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"--gpu-memory-utilization={fraction}: give a fraction above 0 and at most 1, e.g. 0.9.")


def _check_backend_options(args: argparse.Namespace) -> None:
    """Refuse an option the chosen backend does not have, rather than ignore it."""
    for option, (backend, instead) in BACKEND_ONLY_OPTIONS.items():
        if getattr(args, option) is not None and args.backend != backend:
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} is an option of --backend {backend} only, and this serve uses "
                            f"--backend {args.backend}. {instead} Or add --backend {backend}.")


def _parse_adapters(values: List[str]) -> Dict[str, Path]:
    adapters: Dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise UserError(f"--adapter {value}: give NAME=DIR, e.g. --adapter sql=outputs/<run>/lora/adapter.")
        if name in adapters:
            raise UserError(f"--adapter {value}: the name {name!r} is given twice; give each adapter its own name.")
        adapters[name] = Path(directory)
    return adapters


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a busy port fails fast, in one sentence."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on connections whose protocol says TCP.
        # Without it, Nagle's algorithm held each response's body behind the client's delayed ACK: 40 ms a request.
        listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error}). "
                        "Choose another --port (0 picks a free one) or a local --host.") from None
    return listener


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":  # python -m llmexp.cli.serve (``llmexp serve`` is the usual way)
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as error:
        console.error(str(error))
        sys.exit(EXIT_USER_ERROR)
