"""Workers that run in other runtimes' own interpreters (vLLM, ...) for ``qtool bench``: executed as scripts by path,
never imported by qtool (each imports only its runtime and the standard library)."""
