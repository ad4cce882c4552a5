"""Batch-1 greedy decoding where users run models: Hugging Face ``generate()`` on Llama-shaped
models built from a config (random weights, no download), and APT xl, in bf16 and VB speed mode.

    python bench/hf_decode.py --model llama-1b llama-8b apt-xl --json bench/results/hf-decode.json

Variants (each in a fresh subprocess, the same seeded bf16 model built on the card):
  bf16-eager     ``model.generate(ids, max_new_tokens=N)`` as HF documents it (dynamic cache)
  bf16-static    the same after ``model.generation_config.cache_implementation = "static"``:
                 HF's static-cache recipe, which compiles the decode step (CUDA graphs)
  vb-eager       ``vb.optimize(model, mode="speed")`` + ``vb.freeze_fp4(model)``, then as bf16-eager
                 (speed mode's ``generate`` decodes as one CUDA-graph replay a token, dynamic or
                 static cache alike: ``apt_model.optimization.graphed_decode``)
  vb-static      the same, then as bf16-static
  bf16-graphed   bf16 weights in that same graphed loop (``vb.optimize(model, mode="speed",
                 fp4=False)``): what the loop gives without FP4, to tell the two apart
  bnb-4bit       transformers' ``BitsAndBytesConfig(load_in_4bit=True)`` (NF4, bf16 compute),
                 loaded by ``from_pretrained`` from the same weights saved to /dev/shm; eager
  bnb-static     the same, then as bf16-static (HF's static recipe compiles the step with
                 bitsandbytes' layers in it)
For APT xl, "eager" is ``APTModel.generate`` as is and "static" adds
``static_cache=True, cuda_graph=True, compile_step=True`` (its best bf16 configuration).

Timing: each timed call is two ``generate`` calls, of 1 and of N new tokens, timed by CUDA
events: the first is the prefill, the difference over N - 1 the decode time per token (no
stopping criterion per token, which would take speed mode's calls back to Hugging Face's
loop). Median over ``--runs`` calls after a
warm-up call (whose wall time is reported as the first-call time: it includes compiling)
and ``--warmup`` more untimed calls (default none; CUDA-graph trees may still record in the
first calls, which ``cudagraph_tree_runs`` shows per call);
each call's time, its Python garbage collections and their time are kept too.
``--rounds R`` runs the whole set R times, interleaved (ABAB), each variant in a new process
each time: a process's host speed varies (by up to 25% between processes on one lent H200
machine), so the table gives the median over rounds with its range, and each ratio to bf16
as the median of the rounds' back-to-back pairs.
``--profile`` adds a torch.profiler pass per variant: device-busy and host time per token,
kernels per token, and the top ops (written to that folder); ``--cprofile`` the host's
Python time by function (cProfile) of one call. Dynamo's counters (graph
breaks, unique graphs, cudagraph skips) are reported for every variant, and each variant's
ms/token as a percentage of its weight-read floor (the bytes a step must read, at the read
bandwidth measured in the same process: ``variants.floor_fields``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from variants import (
    add_variant_arguments,
    cuda_timed,
    floor_fields,
    read_bandwidth,
    run_in_subprocesses,
    write_results,
)

from apt_model.storage import module_nbytes

MODELS = ("llama-1b", "llama-8b", "llama-8b-thin", "apt-xl")
VARIANTS = ("bf16-eager", "bf16-static", "vb-eager", "vb-static", "bf16-graphed", "bnb-4bit",
            "bnb-static")

# Llama-3.2-1B and Llama-3-8B shapes (their published configs, minus the weights).
LLAMA_SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False),
    # Llama-3-8B's 32 layers and vocabulary at width 256: a step's cost apart from its weight
    # reads (the generate loop, guards, launches), for bf16 and VB alike.
    "llama-8b-thin": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=32,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          tie_word_embeddings=False),
    "llama-tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,  # smoke tests
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       tie_word_embeddings=False, vocab_size=1024),
}


def llama_config(name: str):
    """The ``transformers.LlamaConfig`` of shape ``name`` (a key of ``LLAMA_SHAPES``)."""
    import transformers

    return transformers.LlamaConfig(**{"vocab_size": 128256, "max_position_embeddings": 8192,
                                       "rope_theta": 500000.0, **LLAMA_SHAPES[name]})


def build_llama(name: str, device: torch.device | str):
    """The seeded bf16 ``LlamaForCausalLM`` of shape ``name`` built on ``device``, generating
    exactly the tokens asked for (``always_n_tokens``)."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(llama_config(name), dtype=torch.bfloat16)
    return always_n_tokens(model)


def always_n_tokens(model):
    """No end-of-sequence token: every call generates exactly the tokens asked for."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def _bnb_llama(model, device: torch.device):
    """The same weights through transformers' documented 4-bit route."""
    import transformers

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as folder:
        model.save_pretrained(folder)
        loaded = transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                               device_map={"": device.index or 0},
                                                               dtype=torch.bfloat16)
    return always_n_tokens(loaded)


def timed_generate(generate, prompt: torch.Tensor, new: int):
    """A call of ``generate(prompt, n)`` (greedy, exactly ``n`` new tokens) timed as two calls:
    (prefill ms: the call of one new token, decode ms per token: the call of ``new`` less that,
    over ``new - 1``, the new tokens). The same for every variant: a stopping criterion that
    timed each token would send speed mode's graphed loop back to Hugging Face's."""

    def timed(n: int) -> tuple[float, torch.Tensor]:
        ms, out = cuda_timed(lambda: generate(prompt, n))
        return ms, out[0, prompt.shape[1]:]

    def call() -> tuple[float, float, torch.Tensor]:
        prefill, _ = timed(1)
        full, tokens = timed(new)
        return prefill, (full - prefill) / (new - 1), tokens

    return call


def _hf_generate(model):
    return lambda prompt, n: model.generate(prompt, max_new_tokens=n, do_sample=False)


def _apt_generate(model, static: bool):
    kw = dict(static_cache=True, cuda_graph=True, compile_step=True) if static else {}
    return lambda prompt, n: model.generate(prompt, n, do_sample=False, **kw)


def _cudagraph_tree_counts(device: torch.device) -> tuple[int, int] | None:
    """(graphs recorded, warm-up runs) so far by inductor's CUDA-graph trees on ``device``,
    read from the tree manager's id counters (private; None where they are not found)."""
    from torch._inductor import cudagraph_trees

    try:
        manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
        if manager is None:
            return 0, 0
        recorded = int(re.search(r"-?\d+", repr(manager.graph_counter)).group())
        warmups = -1 - int(re.search(r"-?\d+", repr(manager.warmup_node_counter)).group())
    except (AttributeError, TypeError):
        return None
    return recorded, warmups


class _GcClock:
    """The wall time Python's garbage collector runs inside a ``with`` block (``.ms``)."""

    def __init__(self) -> None:
        self.ms = 0.0
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += 1000 * (time.perf_counter() - self._start)

    def __enter__(self) -> _GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


def _profile(call, tokens: int, path: Path) -> dict:
    """Device-busy and host time per token, kernels per token, the device's idle gaps; the
    top ops, the slowest runtime calls and what the host ran during the longest gaps to
    ``path``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        wall = time.perf_counter()
        call()
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels)
    gaps = _device_gaps(kernels)
    averages = prof.key_averages()
    runtime = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
               and e.name.startswith(("cuda", "cu")) and not e.name.startswith("cudaLaunch")]
    runtime.sort(key=lambda e: e.time_range.elapsed_us(), reverse=True)
    lines = [averages.table(sort_by="cuda_time_total", row_limit=40),
             averages.table(sort_by="cpu_time_total", row_limit=40),
             "slowest runtime calls (us): " + ", ".join(
                 f"{e.name} {e.time_range.elapsed_us():.0f}" for e in runtime[:15])]
    for start, length in sorted(gaps, key=lambda g: -g[1])[:8]:
        lines.append(f"device idle {length:.0f} us from {start - kernels[0].time_range.start:.0f} us; "
                     f"the host ran: {_host_at(events, start + length / 2)}")
    path.write_text("\n".join(lines) + "\n")
    return {"wall_ms_per_token": 1000 * wall / tokens, "device_busy_ms_per_token": busy_us / 1000 / tokens,
            "kernels_per_token": len(kernels) / tokens,
            "device_idle_ms_per_token": sum(g[1] for g in gaps) / 1000 / tokens}


def _device_gaps(kernels: list, least_us: float = 20.0) -> list[tuple[float, float]]:
    """(start, length) in us of each interval of at least ``least_us`` between the first and
    the last kernel in which no kernel ran."""
    gaps, busy_until = [], None
    for e in sorted(kernels, key=lambda e: e.time_range.start):
        if busy_until is not None and e.time_range.start - busy_until >= least_us:
            gaps.append((busy_until, e.time_range.start - busy_until))
        busy_until = max(busy_until or 0.0, e.time_range.end)
    return gaps


def _host_at(events: list, when: float) -> str:
    """The innermost host op running at time ``when`` (us) and its Python stack's top."""
    covering = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
                and e.time_range.start <= when <= e.time_range.end]
    if not covering:
        return "nothing profiled"
    inner = min(covering, key=lambda e: e.time_range.elapsed_us())
    frames = [f for e in covering for f in (e.stack or [])][:6]
    return f"{inner.name} ({inner.time_range.elapsed_us():.0f} us) <- " + " <- ".join(frames)


def _cprofile(call, path: Path, rows: int = 45) -> None:
    """The host's Python time of one call, by function (cProfile, sorted by own time), to
    ``path``: where a host-bound step spends its time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    path.write_text(text.getvalue())


def _dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def run_variant(args: argparse.Namespace) -> dict:
    import apt_model.optimization.vb_global as vb

    device = torch.device("cuda")
    variant = args.variant
    bandwidth = read_bandwidth()  # before the model: the peak below is the model's
    if variant.startswith("bnb-"):
        if args.model == "apt-xl":
            return {"variant": variant, "skipped": "bitsandbytes loads Hugging Face models only"}
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"variant": variant, "skipped": "bitsandbytes is not installed"}
    if variant == "bf16-graphed" and args.model == "apt-xl":
        return {"variant": variant, "skipped": "APT's own generate has its static cache and graphs"}
    if args.model == "apt-xl":
        from apt_model.modeling.apt_model import APTConfig, APTModel

        torch.manual_seed(0)
        with torch.device(device):
            model = APTModel(APTConfig.from_preset("xl", vocab_size=32000)).to(torch.bfloat16)
        model.set_attn_implementation("sdpa")
        model.eval()
        vocab = 32000
    else:
        model = build_llama(args.model, device)
        vocab = model.config.vocab_size
    if variant.startswith("bnb-"):
        model = _bnb_llama(model, device)  # the bf16 copy is freed here
        torch.cuda.empty_cache()
    if variant.startswith("vb-"):
        vb.optimize(model, mode="speed", verbose=False)
        vb.freeze_fp4(model)
    if variant == "bf16-graphed":
        vb.optimize(model, mode="speed", fp4=False, verbose=False)
    static = variant.endswith("-static")
    if static and args.model != "apt-xl":
        model.generation_config.cache_implementation = "static"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    weight_bytes = module_nbytes(model)

    gen = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, vocab, (1, args.prompt), device=device, generator=gen)
    generate = _apt_generate(model, static) if args.model == "apt-xl" else _hf_generate(model)
    call = timed_generate(generate, prompt, args.new)
    wall = time.perf_counter()
    with torch.inference_mode():
        _, _, tokens = call()
        first_call_s = time.perf_counter() - wall
        for _ in range(args.warmup):  # untimed, after the first: until compiled steps replay
            call()
        prefill, per_token, repeats, collections, gc_ms, trees = [], [], [], [], [], []
        for _ in range(args.runs):
            before = [gen["collections"] for gen in gc.get_stats()]
            trees_before = _cudagraph_tree_counts(device)
            with _GcClock() as clock:
                p, t, again = call()
            gc_ms.append(clock.ms)
            trees_after = _cudagraph_tree_counts(device)
            trees.append(None if trees_before is None or trees_after is None else
                         [a - b for a, b in zip(trees_after, trees_before, strict=True)])
            collections.append([gen["collections"] - n for gen, n in zip(gc.get_stats(), before, strict=True)])
            prefill.append(p)
            per_token.append(t)
            repeats.append(torch.equal(again, tokens))
        result = {
            "variant": variant, "model": args.model,
            "weight_bytes": weight_bytes,
            "fp4_layers": sum(type(m).__name__ == "FP4Linear" for m in model.modules()),
            "peak_allocated": torch.cuda.max_memory_allocated(device),
            "first_call_s": first_call_s,
            "prefill_ms": statistics.median(prefill),
            "decode_ms_per_token": statistics.median(per_token),
            "decode_ms_runs": per_token,
            "gc_collections_runs": collections,  # Python's garbage collections (gen 0, 1, 2) a call
            "gc_ms_runs": gc_ms,  # the time those collections took, a call
            # CUDA-graph trees' (graphs recorded, warm-up runs) a call: 0, 0 once it replays
            "cudagraph_tree_runs": trees,
            "decode_tok_s": 1000 / statistics.median(per_token),
            "tokens_repeat": all(repeats),
            **floor_fields(model, statistics.median(per_token), bandwidth),
            "dynamo": _dynamo_counters(),
            "tokens": tokens.tolist(),
        }
        if args.profile:
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            result["profile"] = _profile(call, args.new,
                                         out / f"{args.model}.{variant}.prof.txt")
        if args.cprofile:
            out = Path(args.cprofile)
            out.mkdir(parents=True, exist_ok=True)
            _cprofile(call, out / f"{args.model}.{variant}.cprofile.txt")
    return result


def _print_row(results: list[dict], model: str, variant: str, rounds: int) -> None:
    """One table row: the median over rounds of each figure; the ratio to bf16 with the same
    cache is the median of the rounds' ratios (each round's pair ran back to back)."""
    rows = [r for r in results if r["model"] == model and r["variant"] == variant]
    done = [r for r in rows if "decode_tok_s" in r]
    if not done:
        r = rows[0]
        print(f"{model:13} {variant:12} "
              f"{'SKIPPED ' + r['skipped'] if 'skipped' in r else 'ERROR ' + str(r['error'])}")
        return
    base_variant = "bf16-static" if variant.endswith(("static", "graphed")) else "bf16-eager"
    ratios = []
    for r in done:
        base = next((b for b in results if b["model"] == model and b["variant"] == base_variant
                     and b["round"] == r["round"] and "decode_tok_s" in b), None)
        if base is not None:
            ratios.append(r["decode_tok_s"] / base["decode_tok_s"])

    def med(key: str) -> float:
        return statistics.median(r[key] for r in done)

    ms = [r["decode_ms_per_token"] for r in done]
    spread = f" ({min(ms):.2f}-{max(ms):.2f})" if rounds > 1 else ""
    ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
    if len(ratios) > 1:
        ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
    print(f"{model:13} {variant:12} {med('weight_bytes') / 2**30:11.2f} "
          f"{med('peak_allocated') / 2**30:8.2f} {med('first_call_s'):7.1f} {med('prefill_ms'):10.1f} "
          f"{med('decode_ms_per_token'):8.3f}{spread} {med('decode_tok_s'):7.1f} "
          f"{med('pct_of_floor'):7.0f}% {ratio:>18}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="*", choices=MODELS, default=["llama-1b"])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed calls after the first, for every variant alike")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variants this many times, interleaved, each in a new "
                             "process: host speed differs between processes")
    add_variant_arguments(parser, VARIANTS)
    parser.add_argument("--profile", default="", help="folder for torch.profiler tables (off if empty)")
    parser.add_argument("--cprofile", default="",
                        help="folder for the host's Python profile of one call (off if empty)")
    args = parser.parse_args()
    if args.new < 2:
        parser.error("--new must be at least 2")
    if args.variant:
        args.model = args.model[0]
        print(json.dumps(run_variant(args)))
        return
    results = []
    models = args.model
    for round_ in range(args.rounds):  # variants interleaved: ABAB, not AABB
        for model in models:
            args.model = model
            for r in run_in_subprocesses(__file__, args.only, args,
                                         ("model", "prompt", "new", "runs", "warmup", "profile", "cprofile")):
                results.append({**r, "model": r.get("model", model), "round": round_})
    args.model = models
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} batch=1 prompt={args.prompt} "
          f"new={args.new} greedy, median of {args.runs} calls after {1 + args.warmup} untimed"
          + (f", then of {args.rounds} rounds (min-max)" if args.rounds > 1 else ""))
    print(f"{'model':13} {'variant':12} {'weights GiB':>11} {'peak GiB':>8} {'first s':>7} "
          f"{'prefill ms':>10} {'ms/token':>8} {'tok/s':>7} {'of floor':>8} {'vs bf16 same cache':>18}")
    for model in models:
        for variant in args.only:
            _print_row(results, model, variant, args.rounds)
    write_results(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
