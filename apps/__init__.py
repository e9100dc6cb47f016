"""Application graphs (ensembling, routing, chain summary, mixed, OpenAI batch files) and prompt
building. The builders are re-exported: ``apps.ensemble(models=[...], prompts=[...])``."""

from apps.builders import chain_summary, ensemble, mixed, openai_batch, route, write

__all__ = ["chain_summary", "ensemble", "mixed", "openai_batch", "route", "write"]
