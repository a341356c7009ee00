"""How long structural pruning of a Llama takes before and at its pruning event: torch-pruning's
graph tracing (the previous path) against slicing the known blocks directly (the current one).

The model is ``LlamaForCausalLM`` with SmolLM2-135M's configuration (30 layers, hidden 576, MLP 1536,
9 query / 3 key-value heads, vocabulary 49,152) and random weights: the time depends on the
architecture, not on the values. Two cases: SmolLM2 itself with ``heads=False`` (its grouped-query
attention is not head-pruned: MLP channels only) and the same shape with 9 key/value heads (heads
and MLP channels). Each path runs what ``IterativeMagnitudePruning`` runs on a fresh fit: the checks
and a dry run on a copy before training (``channel_targets.check``), then the pruning itself at the
event (``channel_targets.prune``), removing 25% of the channels / heads. The two paths alternate,
``--repeats`` times each, on fresh copies of one model; medians and their ratio are reported. A
path whose dry run finds the pruned model broken is refused before training (``refused``: why);
its time is then the time to that refusal.

    python benchmarks/pruning_setup.py --out benchmarks/results/pruning_setup.json
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import fair_cpu, parser, write

from lightning_slim.pruning import channel_targets


def smollm2_shaped(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).eval()


def one_run(model, heads: bool, sliced: bool) -> dict:
    """Seconds for the checks + dry run (before the first step) and for the pruning event."""
    plan = channel_targets.resolve(model, None, [], None, heads, None)
    plan.sliced = sliced  # the previous version traced every model with torch-pruning
    example = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    call = channel_targets.call(model, plan, None, None, "auto")
    call = (call[0], example, call[2], call[3])
    t = time.perf_counter()
    try:
        channel_targets.check(model, plan, call, 0.25, fresh=True)
    except ValueError as err:  # the dry run found a model the pruned shapes break: refused before training
        return {"before_first_step_s": time.perf_counter() - t, "refused": str(err)[-160:]}
    before = time.perf_counter() - t
    t = time.perf_counter()
    channel_targets.prune(model, call, 0.25)
    return {"before_first_step_s": before, "pruning_event_s": time.perf_counter() - t}


def main() -> dict:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/pruning_setup.json")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    fair_cpu(args.threads)
    started = time.time()
    results = {}
    for case, kv_heads, heads in [("smollm2_mlp_channels", 3, False), ("mha_heads_and_channels", 9, True)]:
        base = smollm2_shaped(kv_heads)
        runs = {"traced": [], "sliced": []}
        for _ in range(args.repeats):
            for path in runs:  # alternating, each on a fresh copy
                runs[path].append(one_run(copy.deepcopy(base), heads, sliced=path == "sliced"))
        median = lambda rs, k: round(statistics.median(r[k] for r in rs), 3) if k.endswith("_s") else rs[0][k]
        med = {path: {k: median(rs, k) for k in rs[0]} for path, rs in runs.items()}
        total = {path: sum(v for k, v in m.items() if k.endswith("_s")) for path, m in med.items()}
        results[case] = {**med, "speedup_total": round(total["traced"] / total["sliced"], 1)}
        print(case, results[case], flush=True)
    write(args.out, {"repeats": args.repeats, "ratio": 0.25, **results}, started)
    return results


if __name__ == "__main__":
    main()
