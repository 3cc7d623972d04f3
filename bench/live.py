"""Live model work of the dashboard: "which neurons fire on my text?" and interventions, on loaded models.

    python /work/shared/tools/paper_shape_family.py /tmp/paper 2     # two random GPT-2-small-shaped folders
    python bench/live.py /tmp/paper/seed-0 /tmp/paper/seed-1 --tokens 200

Times the computations the routes run inside the live runner (`app.intervene.firing` for the top neurons, the
partner's run that reads the twins' activations, `app.intervene.intervene` and `agreement` for an intervention),
not HTTP or SQL, with the server's default of one torch thread (``--threads``). Each is repeated (``--repeat``)
after one warm-up; prints one JSON line with the medians in milliseconds, wall clock and CPU (this process's), with
the machine's load average (other work on a shared machine stretches the wall clock, not the CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def median_ms(work: Any, repeat: int) -> dict[str, float]:
    """Median wall and CPU milliseconds of `work`. On a shared machine the CPU time (this process's) is what the
    work costs; the wall time also holds the waits for a core (with one torch thread the two agree when idle)."""
    work()  # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        work()
        wall.append(1000 * (time.perf_counter() - started))
        cpu.append(1000 * (time.process_time() - started_cpu))
    return {"wall": round(statistics.median(wall), 1), "cpu": round(statistics.median(cpu), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs=2, help="two Hugging Face GPT-2 folders (the model and a partner)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens of the text (BOS added in front)")
    parser.add_argument("--k", type=int, default=20, help="neurons listed over the whole text")
    parser.add_argument("--per-token", type=int, default=5, help="neurons listed per token")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the server's default: 1)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    import numpy as np
    import torch

    from app.intervene import Clamp, agreement, firing, intervene
    from precompute.activations import run_mlp_hooks
    from precompute.models import load_model, resolve_source
    from precompute.stdlib_corpus import stdlib_documents

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, partner = (load_model(resolve_source(m)) for m in args.models)
    load_s = time.perf_counter() - started
    text = "\n".join(stdlib_documents("validation")[:5])
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    row = [model.tokenizer.bos_token_id, *ids]
    rng = np.random.default_rng(0)
    universal = rng.random(model.n_neurons) < 0.05  # a paper-like share of universal neurons
    found = firing(model, row, 1, args.k, args.per_token, None)
    twins = [(int(f) // partner.d_mlp, int(f) % partner.d_mlp) for f in found.top]  # stand-in twin ids

    def twin_run() -> None:  # what LiveRunner.run does for the twins of the listed neurons
        post = run_mlp_hooks(partner, torch.tensor([row]), ("hook_post",))["hook_post"]
        layers = torch.tensor([t[0] for t in twins])
        units = torch.tensor([t[1] for t in twins])
        post[:, :, layers, units].cpu().numpy()

    clamp = Clamp(layer=model.n_layers - 1, neuron=7, value=5.0, positions=None)

    def intervention() -> None:  # the model and one twin, with their agreement
        first, delta = intervene(model, row, 1, clamp, 5)
        second, twin_delta = intervene(partner, row, 1, clamp, 5)
        agreement(delta, twin_delta, np.union1d(first.moved_ids, second.moved_ids))

    result = {
        "shape": {"n_layers": model.n_layers, "d_mlp": model.d_mlp, "d_model": model.d_model, "d_vocab": model.d_vocab},
        "tokens": len(ids),
        "threads": args.threads,
        "load_s": round(load_s, 1),
        "top_neurons_ms": median_ms(lambda: firing(model, row, 1, args.k, args.per_token, None), args.repeat),
        "top_neurons_universal_only_ms": median_ms(
            lambda: firing(model, row, 1, args.k, args.per_token, universal), args.repeat
        ),
        "twins_one_partner_ms": median_ms(twin_run, args.repeat),
        "intervene_with_one_twin_ms": median_ms(intervention, args.repeat),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
