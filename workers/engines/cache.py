"""Keeps one loaded engine per worker process between tasks.

A worker serves one GPU group, so it holds at most one engine. The next task reuses it when it
asks for an equal :class:`~workers.engines.base.EngineKey` (no load time); any other key closes
the held engine first (freeing device memory) and then loads the new one.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.engines.base import Engine, EngineKey


class EngineCache:
    """The worker's one loaded engine, built by ``builder`` on demand."""

    def __init__(self, builder: Callable[[EngineKey], Engine]) -> None:
        self._builder = builder
        self._key: EngineKey | None = None
        self._engine: Engine | None = None

    def get(self, key: EngineKey) -> tuple[Engine, bool]:
        """The engine for ``key`` and whether it was loaded by this call.

        An equal key reuses the held engine; otherwise the held one is closed before the
        new one is built (two engines never hold the GPUs at once). If building fails, the
        cache holds nothing.
        """
        if self._engine is not None and self._key == key:
            return self._engine, False
        self.release()
        engine = self._builder(key)
        self._key, self._engine = key, engine
        return engine, True

    def release(self) -> None:
        """Close the held engine, if any, and forget it."""
        engine, self._engine, self._key = self._engine, None, None
        if engine is not None:
            engine.close()

    @property
    def held(self) -> EngineKey | None:
        """Key of the held engine, or None."""
        return self._key
