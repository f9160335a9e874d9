"""`cde-jax serve`: embeddings over HTTP, each corpus's context held in memory: OpenAI's
embeddings API (POST /v1/embeddings, GET /v1/models; a request's `model` names the context),
text-embeddings-inference's POST /embed, GET /health and GET /metrics (Prometheus).

Requests wait in one bounded queue (full: 429 with Retry-After) and are batched
continuously (whatever is queued when the devices are free, up to --max-batch-tokens);
every bucket up to --max-seq-length is compiled before the server accepts a request.
Contexts can be added and removed over the API (POST/GET /v1/contexts, DELETE
/v1/contexts/NAME), kept across restarts in --context-dir. With --api-key (or
CDE_JAX_API_KEY, or --api-key-file) every route but /health needs Authorization: Bearer KEY.
SIGTERM (or Ctrl-C) stops accepting, answers every request already accepted, and exits 0.
Needs the serve extra: pip install 'cde-jax[serve]'.

example:
  cde-jax serve --model cde-small-v2-jax --context scifact=scifact.npz --port 8080
  CDE_JAX_API_KEY=secret cde-jax serve --model M --context-dir contexts/
"""

from __future__ import annotations

import signal
import sys

from ..serving.config import ServeConfig
from ..tokenization import quiet_truncation
from ..validation import UserError
from . import flags, runtime

SERVER_LIBRARIES = ("fastapi", "uvicorn", "prometheus_client")


def register(subparsers) -> None:
    parser = runtime.add_command(subparsers, "serve", __doc__,
                                 help="serve embeddings over HTTP (OpenAI and TEI APIs)")
    runtime.add_model_args(parser, processes=False)
    flags.add_config_flags(parser, ServeConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    cfg = flags.config_from_args(ServeConfig, args)
    try:
        import uvicorn  # noqa: F401  (checked here: the server's libraries are an extra)

        from ..serving import app  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name not in SERVER_LIBRARIES:
            raise
        raise UserError(f"the server needs {e.name}: pip install 'cde-jax[serve]'") from None
    runtime.enable_compilation_cache()
    # Cutting is a request's default here, not news: /metrics counts it instead of a warning
    # line per request.
    with quiet_truncation():
        return _serve(args, cfg)


def _serve(args, cfg: ServeConfig) -> int:
    import numpy as np
    import uvicorn

    from ..serving.app import EmbeddingService, build_app
    from ..serving.batcher import Batcher, BatchShapes
    from ..serving.contexts import ContextStore
    from ..serving.metrics import Metrics

    keys = cfg.keys()  # before loading anything: a bad key file stops here
    model = runtime.load_model(args)
    model.max_seq_length = cfg.max_seq_length
    contexts = ContextStore(model, cfg.context_dir)
    contexts.load(cfg.contexts)
    # Every context has the minicorpus size of rows: one prefix length, compiled once.
    shape_of = model.context(np.zeros((model.config.transductive_corpus_size,
                                       model.hidden_size), np.float32))
    metrics = Metrics()
    metrics.watch_compiles()  # from here on: the warm-up's compilations, then none
    shapes = BatchShapes(model, shape_of.prefix_length, args.batch_size)
    batcher = Batcher(shapes, metrics, max_queue=cfg.max_queue,
                      max_batch_tokens=cfg.max_batch_tokens)
    shapes.warm_up(shape_of)
    service = EmbeddingService(contexts, batcher, metrics,
                               max_client_batch_size=cfg.max_client_batch_size)
    app = build_app(service, keys=keys, public_metrics=cfg.public_metrics,
                    payload_limit=cfg.payload_limit)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, access_log=args.verbose,
                            ssl_certfile=cfg.ssl_certfile, ssl_keyfile=cfg.ssl_keyfile,
                            log_level="error" if args.quiet else
                            "info" if args.verbose else "warning")
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    if not args.quiet:
        scheme = "https" if cfg.ssl_certfile else "http"
        print(f"cde-jax serve: listening on {scheme}://{host}:{port} (models: "
              f"{', '.join(contexts.contexts) or 'none yet'}; "
              f"{f'{len(keys)} API key(s)' if keys else 'no API key: open to all'})",
              file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again to the handler it found:
    # this one, so that a drained server exits 0 (not killed by its own signal).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        return 1  # uvicorn has logged why
    if not args.quiet:
        print("cde-jax serve: stopped", file=sys.stderr)
    return 0
