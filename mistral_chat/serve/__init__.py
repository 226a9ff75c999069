"""`mistral-chat serve`: a local OpenAI-compatible HTTP server (needs the `serve` extra: starlette, uvicorn).

`create_app(model)` (in `serve.app`) is the ASGI app; `serve.worker.EngineWorker` the one thread that runs the
model, answering the requests together (continuous batching). Importing this package imports neither.
"""
