"""`parspec serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine,
with streaming, a bounded queue, client-disconnect aborts and Prometheus metrics."""

DEFAULT_MAX_REQUEST_BODY = 10 * 2**20  # bytes; a prompt at the longest context is far below this
