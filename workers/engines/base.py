"""The small engine interface the runner drives, shaped like vLLM's ``LLMEngine`` loop.

An engine serves requests added with :meth:`Engine.add_request`; each :meth:`Engine.step` runs
one engine iteration (the sim engine: one simulated iteration, or a short batch of them) and
returns one :class:`StepUpdate` per request that advanced. :meth:`Engine.abort_request` removes
a request and returns its generated prefix, so the runner can hand it back to the coordinator
(cooperative preemption). Engines are built by :mod:`workers.engines.factory` from an
:class:`EngineKey` and kept loaded between tasks when the plan says the next task uses the same
configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class EngineKey:
    """What identifies a loaded engine: the same key may be reused by the next task."""

    model: str  # Hugging Face id or local folder
    tp: int  # GPUs (tensor parallel)
    max_num_seqs: int  # sequences per step
    max_num_batched_tokens: int  # tokens per step
    max_model_len: int | None  # tokens; None = the model's
    gpu_memory_utilization: float  # fraction of device memory
    dtype: str
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # KV pool incl. vLLM's null block; None = from memory
    trust_remote_code: bool = False
    chat_template: str = "auto"  # auto (when the tokenizer has one) | required | off
    seed: int = 0  # engine sampling seed
    path: str | None = None  # what vLLM loads (local folder or HF id); None = ``model``


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request for an engine; a preempted request carries its generated prefix."""

    key: str  # "<node>/<request id>"
    prompt: str  # text
    prompt_tokens: int  # tokens (without the prefix)
    max_tokens: int  # tokens, cap on the total output (prefix included)
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False
    generated_text: str = ""  # prefix generated before a preemption
    generated_tokens: int = 0  # tokens of the prefix
    messages: tuple[tuple[str, str], ...] = ()  # chat (role, content); used instead of prompt
    choices: tuple[str, ...] = ()  # a router's labels (the sim engine answers with one)
    completion: bool = False  # a raw completion prompt: never through the chat template


@dataclass(frozen=True, slots=True)
class StepUpdate:
    """A request that advanced in one step."""

    key: str
    tokens: int  # tokens generated so far in total (prefix included)
    finished: bool
    text: str = ""  # the whole output text (prefix included) when finished, else ""
    finish_reason: Literal["stop", "length"] | None = None  # when finished


@dataclass(frozen=True, slots=True)
class Aborted:
    """What an aborted request had generated (prefix included)."""

    key: str
    text: str
    tokens: int


class Engine(Protocol):
    """What the runner needs from an engine."""

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; it is scheduled from the next step on."""
        ...

    def step(self) -> list[StepUpdate]:
        """Run one iteration; updates for requests that advanced (finished ones last time)."""
        ...

    def abort_request(self, key: str) -> Aborted:
        """Remove an unfinished request and return its generated prefix."""
        ...

    def has_unfinished_requests(self) -> bool:
        """Whether any added request is still unfinished."""
        ...

    @property
    def clock_s(self) -> float:
        """Engine clock in seconds (simulated seconds on the sim engine, wall on vLLM)."""
        ...

    @property
    def last_step_s(self) -> float:
        """Latency of the last step on the engine clock (seconds)."""
        ...

    @property
    def load_s(self) -> float:
        """Engine-clock seconds the engine took to load."""
        ...

    def close(self) -> None:
        """Free the engine's memory (device memory on GPUs)."""
        ...
