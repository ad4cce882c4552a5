"""The host's cost of calling a compiled Hugging Face decode step: dynamo's guard check and
the bytecode around the graph, without the graph's own work.

    python bench/compile_overhead.py --layers 32 --json bench/results/compile-overhead-cpu.json

A Llama-shaped model (``--layers`` layers, 256 wide: the guards depend on the modules, not
their width) is compiled with ``fullgraph=True`` and a backend that runs the captured graph
once and then returns its outputs as they are, so a call costs only what a compiled step
pays on the host before and after its graph (under HF's static-cache recipe that time is
serialized with the device, once per token). Variants, each in a fresh subprocess: bf16, and
VB speed mode frozen to FP4. Reports the best of ``--batches`` batches of 50 calls and the
number of guards of the decode graph.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from hf_decode import LLAMA_SHAPES, build_llama
from variants import add_variant_arguments, run_in_subprocesses, write_results

VARIANTS = ("bf16", "vb")


def _guard_count(compiled_code) -> int:
    """Checks in the guard tree of ``compiled_code``'s newest cache entry, as
    ``TORCH_LOGS=guards`` prints them (each ``+-`` line that is not a manager), less the
    dynamic-shape markings, which check nothing at run time."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    tree = str(_debug_get_cache_entry_list(compiled_code)[0].guard_manager).splitlines()
    return sum(1 for line in tree if "+- " in line and "GuardManager" not in line
               and "DIMENSION_DYNAMIC" not in line)


def run_variant(args: argparse.Namespace) -> dict:
    import transformers

    import apt_model.optimization.vb_global as vb

    LLAMA_SHAPES["llama-deep"] = dict(LLAMA_SHAPES["llama-tiny"], num_hidden_layers=args.layers)
    model = build_llama("llama-deep", "cpu")
    if args.variant == "vb":
        vb.optimize(model, mode="speed", verbose=False)
        vb.freeze_fp4(model)

    def replay_backend(gm, example_inputs):
        kept = []

        def run(*inputs):
            if not kept:
                kept.append(gm.forward(*inputs))
            return kept[0]

        return run

    step = torch.compile(model.forward, backend=replay_backend, fullgraph=True)
    ids = torch.randint(0, 1000, (1, 8))
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    one, position = ids[:, :1], torch.tensor([8])
    with torch.inference_mode():
        model(ids, past_key_values=cache, cache_position=torch.arange(8))
        for _ in range(3):
            step(one, past_key_values=cache, cache_position=position)
        batches = []
        for _ in range(args.batches):
            start = time.perf_counter()
            for _ in range(50):
                step(one, past_key_values=cache, cache_position=position)
            batches.append((time.perf_counter() - start) / 50 * 1e6)
    code = getattr(model.forward, "__func__", model.forward).__code__
    try:
        guards = _guard_count(code)
    except (AttributeError, IndexError, RuntimeError):  # dynamo internals differ by version
        guards = None
    return {"variant": args.variant, "layers": args.layers, "us_per_call": min(batches),
            "us_per_call_batches": batches, "guards": guards}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", type=int, default=15)
    add_variant_arguments(parser, VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = run_in_subprocesses(__file__, args.only, args, ("layers", "batches"))
    print(f"\ntorch {torch.__version__}, {args.layers} layers, best of {args.batches} x 50 calls")
    for r in results:
        if "us_per_call" in r:
            print(f"{r['variant']:5} {r['us_per_call']:8.0f} us a call   guards {r['guards']}")
        else:
            print(f"{r['variant']:5} ERROR {r.get('error')}")
    import platform

    write_results(args.json, {"device": f"CPU ({platform.processor() or platform.machine()}, "
                              f"{torch.get_num_threads()} threads)", "args": vars(args),
                              "results": results})


if __name__ == "__main__":
    main()
