"""Error of the scaled (subsampled) simulation against the exact one, and its speed.

Belief = truth here on purpose: both sides are the same simulator; the figure is the error the
planner's scaling adds (planning/unit_sim.py). Workload: 10,000 requests, prompts uniform
20..399 tokens, outputs from the authors' pdf of each model capped at 512, seed 0; shipped A100
profiles. For each (model, tp, dp): exact makespan, then makespan and CPU ms per budget.
Usage: python bench/scaled_sim_error.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.settings import load_settings  # noqa: E402
from planning.estimate import ServingConfig, engine_for  # noqa: E402
from planning.io.lengths import load_authors_pdfs  # noqa: E402
from planning.io.profiles import load_default_profiles  # noqa: E402
from planning.unit_sim import Work, run_work  # noqa: E402

MODELS = ("lmsys/vicuna-13b-v1.5", "databricks/dolly-v2-12b", "mosaicml/mpt-7b-chat")


def main() -> None:
    ps = load_default_profiles()
    pdfs = load_authors_pdfs(load_settings().default_lengths)
    rng = np.random.default_rng(0)
    n = 10_000
    prompts = rng.integers(20, 400, n).astype(np.int64)
    print("model tp dp | exact s (ms) | budget: scale, error, ms ...")
    for model in MODELS:
        outs = pdfs[model].sample(rng, n, max_tokens=512, context_left=2048 - prompts)
        w = Work(prompts, outs.astype(np.int64), np.zeros(n, np.int64), np.zeros(n),
                 np.full(n, -1, np.int64))
        for tp, dp in ((1, 1), (2, 1), (1, 4), (2, 4)):
            prof = ps.get(model, tp)
            eng = engine_for(prof, ps.gpu, ServingConfig())
            cells = []
            exact = None
            for budget in (None, 4000, 2000, 1000, 500):
                began = time.process_time()
                r = run_work(w, eng, prof.step, dp, budget=budget)
                ms = (time.process_time() - began) * 1000
                if exact is None:
                    exact = r.total_s
                    cells.append(f"{exact:7.1f} ({ms:4.0f})")
                else:
                    cells.append(f"{budget}: s={r.scale} {r.total_s / exact - 1:+.3f} {ms:4.0f}")
            print(f"{model.split('/')[1]:<16} {tp} {dp} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
