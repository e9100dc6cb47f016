"""Application graphs (ensembling, routing, chain summary) and prompt building."""
