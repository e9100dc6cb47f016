"""Coordinator: wire schemas, service loop, dispatch, CLI (kept empty at import)."""
