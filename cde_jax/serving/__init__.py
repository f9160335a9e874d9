"""`cde-jax serve`: an embedding server with each corpus's context resident.

OpenAI's embeddings API and text-embeddings-inference's `/embed` on FastAPI + uvicorn
(`app`, `protocol`), API keys and the body limit (`security`), one bounded queue and a
continuous batcher running the model in a thread (`batcher`), Prometheus metrics
(`metrics`), the settings (`config`). Each context (a corpus's dataset embeddings and its
prefix, `cde_jax.Context`) is computed once, at start-up or when made over the API
(`contexts`), and selected by a request's `model`.

Nothing is imported here: the server's libraries (the `serve` extra) are needed only by
the server, not by the CLI that lists `cde-jax serve`'s flags.
"""
