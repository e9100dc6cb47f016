"""The truth (lengths, profiles, truth files), the sim engine and the engine cache.

Fast: a fake wall clock stands in for ``time.sleep``/``time.monotonic``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from apps.cluster_spec import SpecError
from apps.tokens import estimate_tokens
from planning.batching_sim import SimRequest, simulate
from workers.engines.base import EngineKey, EngineRequest, StepUpdate
from workers.engines.cache import EngineCache
from workers.engines.factory import build_engine
from workers.engines.sim_engine import SimEngine
from workers.engines.vllm_engine import ModelFolderError
from workers.truth import DEFAULT_TRUTH_SEED, Truth, TruthError, TruthWorld, load_truth

LENGTHS = Path(__file__).resolve().parents[3] / "shared" / "data" / "output_length_pdfs.json"
MODEL = "lmsys/vicuna-13b-v1.5"  # measured profile at tp 1, 2, 4 and an authors' pdf
KEY = EngineKey(MODEL, 1, 64, 2048, None, 0.9, "float16")

pytestmark = pytest.mark.skipif(not LENGTHS.is_file(), reason=f"no shared data at {LENGTHS}")


class FakeClock:
    """``now``/``sleep`` pair: sleeping advances the fake wall instantly."""

    def __init__(self) -> None:
        self.t = 100.0  # s
        self.slept = 0.0  # s
        self.sleeps = 0

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.slept += s
        self.sleeps += 1


@pytest.fixture(scope="module")
def world() -> TruthWorld:
    return TruthWorld(Truth(lengths_path=LENGTHS))


def _world(**kw: object) -> TruthWorld:
    return TruthWorld(Truth(lengths_path=LENGTHS, **kw))  # type: ignore[arg-type]


def _requests(n: int, max_tokens: int = 512) -> list[EngineRequest]:
    return [EngineRequest(f"node/{i}", "x", 20 + 7 * i, max_tokens) for i in range(n)]


def _engine(world: TruthWorld, clock: FakeClock, scale: float = 1.0, **kw: object) -> SimEngine:
    return SimEngine(KEY, world, scale, sleep=clock.sleep, now=clock.now, **kw)  # type: ignore[arg-type]


def _drain(engine: SimEngine) -> Iterator[StepUpdate]:
    while engine.has_unfinished_requests():
        yield from engine.step()


# ------------------------------------------------------------------ truth lengths
def test_lengths_are_deterministic_per_key_and_seed(world: TruthWorld) -> None:
    again = _world()
    a = [world.length(MODEL, f"n/{i}", 50, 4096, 4096, False) for i in range(40)]
    b = [again.length(MODEL, f"n/{i}", 50, 4096, 4096, False) for i in range(40)]
    assert a == b
    assert len(set(a)) > 10  # keys get different lengths
    assert world.truth.seed == DEFAULT_TRUTH_SEED


def test_lengths_differ_across_seeds(world: TruthWorld) -> None:
    other = _world(seed=1)
    a = [world.length(MODEL, f"n/{i}", 50, 4096, 4096, False) for i in range(40)]
    b = [other.length(MODEL, f"n/{i}", 50, 4096, 4096, False) for i in range(40)]
    assert a != b


def test_length_by_short_name_equals_by_id(world: TruthWorld) -> None:
    assert world.distribution("vicuna-13b-v1.5") is world.distribution(MODEL)


def test_length_scale_doubles_the_mean(world: TruthWorld) -> None:
    doubled = _world(length_scale={MODEL: 2.0})
    keys = [f"n/{i}" for i in range(400)]
    base = np.mean([world.length(MODEL, k, 10, 10**6, 10**7, False) for k in keys])
    twice = np.mean([doubled.length(MODEL, k, 10, 10**6, 10**7, False) for k in keys])
    assert twice == pytest.approx(2.0 * base, rel=0.01)


def test_lengths_are_clipped(world: TruthWorld) -> None:
    keys = [f"n/{i}" for i in range(100)]
    assert max(world.length(MODEL, k, 50, 5, 4096, False) for k in keys) == 5
    assert max(world.length(MODEL, k, 4090, 4096, 4096, False) for k in keys) == 6  # context
    assert world.length(MODEL, "n/0", 50, 300, 4096, True) == 300  # ignore_eos: the cap
    assert world.length(MODEL, "n/0", 5000, 300, 4096, True) == 1  # at least 1


def test_unknown_model_names_the_model(world: TruthWorld) -> None:
    with pytest.raises(TruthError, match="acme/nonexistent-7b"):
        world.length("acme/nonexistent-7b", "n/0", 10, 100, 4096, False)
    with pytest.raises(TruthError, match=r"acme/nonexistent-7b.*tp=1.*profiles:"):
        world.profile("acme/nonexistent-7b", 1)
    with pytest.raises(TruthError, match="acme/nonexistent-7b"):
        SimEngine(replace(KEY, model="acme/nonexistent-7b"), world, 0.0)


# ------------------------------------------------------------------ truth file
def test_load_truth_reads_scales_and_paths(tmp_path: Path) -> None:
    (tmp_path / "pdfs.json").write_text(LENGTHS.read_text())
    f = tmp_path / "truth.yaml"
    f.write_text(f"seed: 7\nlengths: pdfs.json\nmodels:\n  {MODEL}: {{length_scale: 2.0}}\n")
    truth = load_truth(f)
    assert truth.seed == 7 and truth.lengths_path == tmp_path / "pdfs.json"
    assert truth.length_scale == {MODEL: 2.0} and truth.latency_scale == {MODEL: 1.0}
    assert truth.profiles_path is None
    assert load_truth(None).seed == DEFAULT_TRUTH_SEED


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("models:\n  m: {length_scale: -1}\n", r"truth.yaml: models.m.length_scale: .*greater"),
        ("seed: x\n", r"truth.yaml: seed: "),
        ("lengths: missing.json\n", r"truth.yaml: lengths: file not found"),
        ("colour: red\n", r"truth.yaml: colour: "),
        ("- 1\n", r"truth.yaml: top level: expected a mapping"),
    ],
)
def test_load_truth_errors_name_file_and_field(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "truth.yaml"
    f.write_text(text)
    with pytest.raises(SpecError, match=match):
        load_truth(f)


# ------------------------------------------------------------------ sim engine
def test_engine_matches_truth_and_simulate(world: TruthWorld) -> None:
    clock = FakeClock()
    engine = _engine(world, clock, scale=0.5)
    reqs = _requests(60)
    for r in reqs:
        engine.add_request(r)
    done = {u.key: u for u in _drain(engine) if u.finished}
    cfg = engine.engine_config
    truth = {r.key: world.length(MODEL, r.key, r.prompt_tokens, r.max_tokens,
                                 cfg.max_model_len, False) for r in reqs}  # fmt: skip
    assert {k: u.tokens for k, u in done.items()} == truth
    for u in done.values():
        assert u.text == "tok " * u.tokens and estimate_tokens(u.text) == u.tokens
        assert u.finish_reason == ("length" if u.tokens == 512 else "stop")
    sim = simulate([SimRequest(r.prompt_tokens, truth[r.key]) for r in reqs], cfg,
                   engine.profile.step)  # fmt: skip
    assert engine.load_s == pytest.approx(engine.profile.load_time_s)
    assert engine.clock_s == pytest.approx(sim.total_s + engine.load_s, abs=1e-6)
    assert engine.steps_done == sim.num_steps
    assert engine.step() == []


def test_updates_report_progress_monotonically(world: TruthWorld) -> None:
    engine = _engine(world, FakeClock(), scale=1.0)
    for r in _requests(5):
        engine.add_request(r)
    seen: dict[str, int] = {}
    calls = 0
    while engine.has_unfinished_requests():
        before = engine.clock_s
        for u in engine.step():
            assert u.tokens > seen.get(u.key, 0)
            seen[u.key] = u.tokens
        calls += 1
        assert engine.clock_s > before
        assert engine.last_step_s > 0
    assert calls == engine.steps_done  # time_scale 1, ~30 ms steps > 20 ms tick: one per call


def test_abort_then_continue_reaches_the_same_length(world: TruthWorld) -> None:
    clock = FakeClock()
    engine = _engine(world, clock)
    reqs = _requests(8)
    for r in reqs:
        engine.add_request(r)
    early = {u.key for _ in range(40) for u in engine.step() if u.finished}
    victim = max(reqs, key=lambda r: world.length(MODEL, r.key, r.prompt_tokens, 512, 4096, False))
    aborted = engine.abort_request(victim.key)
    assert aborted.tokens > 0 and aborted.text == "tok " * aborted.tokens
    with pytest.raises(KeyError):
        engine.abort_request(victim.key)
    others = early | {u.key for u in _drain(engine) if u.finished}
    assert others == {r.key for r in reqs} - {victim.key}

    fresh = _engine(world, clock)
    cont = replace(victim, generated_text="PREFIX " + aborted.text, generated_tokens=aborted.tokens)
    fresh.add_request(cont)
    (last,) = [u for u in _drain(fresh) if u.finished]
    want = world.length(MODEL, victim.key, victim.prompt_tokens, 512, 4096, False)
    assert last.tokens == want
    assert last.text == "PREFIX " + "tok " * want


def test_prefix_already_at_truth_finishes_without_time(world: TruthWorld) -> None:
    engine = _engine(world, FakeClock())
    r = _requests(1)[0]
    want = world.length(MODEL, r.key, r.prompt_tokens, 512, 4096, False)
    engine.add_request(replace(r, generated_text="old", generated_tokens=want + 3))
    before = engine.clock_s
    (u,) = engine.step()
    assert (u.finished, u.tokens, u.text) == (True, want + 3, "old")
    assert engine.clock_s == before and not engine.has_unfinished_requests()


def test_pacing_sleeps_simulated_time_times_scale(world: TruthWorld) -> None:
    clock = FakeClock()
    engine = _engine(world, clock, scale=2.0)
    assert clock.slept == pytest.approx(engine.load_s * 2.0)
    for r in _requests(20):
        engine.add_request(r)
    clock.t += 50.0  # idle wall time before the first step is not counted
    list(_drain(engine))
    assert clock.slept == pytest.approx(engine.clock_s * 2.0, rel=1e-9)
    calls_per_step = clock.sleeps / engine.steps_done
    assert calls_per_step == pytest.approx(1.0, abs=0.01)  # ~30 ms x 2 > 20 ms tick


def test_slow_caller_catches_up(world: TruthWorld) -> None:
    clock = FakeClock()
    engine = _engine(world, clock, scale=1.0)
    for r in _requests(20):
        engine.add_request(r)
    engine.step()
    clock.t += 1.0  # the caller stalled for a second
    engine.step()
    assert engine.last_step_s > 0
    # the stalled second was consumed in simulated steps: the wall and clock agree again
    assert clock.t - 100.0 == pytest.approx(engine.clock_s, abs=0.1)


def test_latency_scale_scales_total_time(world: TruthWorld) -> None:
    slow = _world(latency_scale={MODEL: 1.3})
    totals = []
    for w in (world, slow):
        engine = _engine(w, FakeClock(), scale=0.0)
        for r in _requests(30):
            engine.add_request(r)
        list(_drain(engine))
        totals.append(engine.clock_s)
    assert totals[1] == pytest.approx(1.3 * totals[0], rel=1e-9)


def test_time_scale_zero_runs_to_the_end_in_one_call(world: TruthWorld) -> None:
    clock = FakeClock()
    engine = _engine(world, clock, scale=0.0)
    for r in _requests(10):
        engine.add_request(r)
    updates = engine.step()
    assert sum(u.finished for u in updates) == 10 and clock.slept == 0.0


def test_bad_requests_and_closed_engine(world: TruthWorld) -> None:
    engine = _engine(world, FakeClock())
    r = _requests(1)[0]
    engine.add_request(r)
    with pytest.raises(ValueError, match="already"):
        engine.add_request(r)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(replace(r, key="big", prompt_tokens=10**6))
    engine.close()
    assert not engine.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()


# ------------------------------------------------------------------ factory and cache
def test_factory_builds_sim_and_checks_vllm_models_first(
    world: TruthWorld, tmp_path: Path
) -> None:
    engine = build_engine("sim", KEY, truth=world, time_scale=0.0)
    assert isinstance(engine, SimEngine)
    with pytest.raises(ValueError, match="truth"):
        build_engine("sim", KEY, truth=None, time_scale=0.0)
    # The vLLM engine checks a local model folder before vLLM is even imported.
    missing = replace(KEY, path=str(tmp_path / "nope"))
    with pytest.raises(ModelFolderError, match="nope: no such folder"):
        build_engine("vllm", missing, truth=None, time_scale=1.0)
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text('{"architectures": ["BertModel"]}')
    encoder = replace(KEY, path=str(tmp_path / "enc"))
    with pytest.raises(ModelFolderError, match="not a causal language model"):
        build_engine("vllm", encoder, truth=None, time_scale=1.0)


class _FakeEngine:
    def __init__(self, key: EngineKey) -> None:
        self.key = key
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_engine_cache_reuses_and_closes() -> None:
    built: list[_FakeEngine] = []

    def builder(key: EngineKey) -> _FakeEngine:
        built.append(_FakeEngine(key))
        return built[-1]

    cache = EngineCache(builder)  # type: ignore[arg-type]
    assert cache.held is None
    a, loaded = cache.get(KEY)
    assert loaded and cache.held == KEY
    again, loaded = cache.get(replace(KEY))  # equal key: reused
    assert again is a and not loaded and len(built) == 1
    b, loaded = cache.get(replace(KEY, tp=2))
    assert loaded and b is not a and built[0].closed and not built[1].closed
    cache.release()
    assert cache.held is None and built[1].closed
    cache.release()  # nothing held: no-op


def test_requests_added_mid_run_finish_at_their_truth(world: TruthWorld) -> None:
    engine = _engine(world, FakeClock())
    reqs = _requests(12)
    for r in reqs[:6]:
        engine.add_request(r)
    done = {u.key: u.tokens for _ in range(30) for u in engine.step() if u.finished}
    for r in reqs[6:]:
        engine.add_request(r)
    done |= {u.key: u.tokens for u in _drain(engine) if u.finished}
    cfg = engine.engine_config
    assert done == {
        r.key: world.length(MODEL, r.key, r.prompt_tokens, 512, cfg.max_model_len, False)
        for r in reqs
    }
