"""The `mistral-chat` command line (typer)."""
