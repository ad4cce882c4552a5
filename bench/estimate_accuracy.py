"""How right is ``vb.estimate``? Its predicted peak of one training step against the peak a
real step reaches, for every mode of ``bench/modes.py`` the estimator can name, over a
batch × sequence sweep, on the APT model and Hugging Face Llama and GPT-2 shapes built from
configs (random weights, no download); beside it, accelerate's ``estimate-memory`` figure
("Training using Adam") for the same model when accelerate is installed.

    python bench/estimate_accuracy.py --json bench/results/estimate-accuracy.json
    python bench/estimate_accuracy.py --device cpu --scale tiny --batches 1,2 --seqs 32,64   # smoke test

Variants: ``<model>/<mode>``, each in a fresh subprocess (no allocator state leaks between
them), which prints one JSON line per finished row; the rows are printed and ``--json``
rewritten as they come, so a run cut short keeps every row it finished. In each variant, the model is built on the device (``vb.optimize(model, mode=...)`` for the VB
modes; the fp32-eager baseline of modes.py is mode "off"), AdamW takes one step at the
smallest shape so its state exists (the estimator's traced step starts with the state too), and then
for every batch × sequence length: ``zero_grad(set_to_none=True)``, reset the peak, one
step (``loss = model(input_ids=x, labels=x).loss``; backward; ``opt.step()``), read the peak.
- CUDA: the peak is ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``; the prediction compared with it is the traced peak
  without the runtime allowance (``Estimate.traced_peak``: the counter does not see the CUDA
  context either).
- CPU: there is no allocator counter, so the real step is counted by the estimator's own
  tracker on the real tensors (``apt_model.estimator.measure``): a smoke test of the script
  and of the traced step against the real one, not an independent measurement.
A shape that runs out of memory is recorded as such, with its prediction.

modes.py's hand-written bf16-sdpa baselines put autocast in the training loop, outside the
model, where the estimator (which traces ``model(...)``) cannot see it: they are left out.
accelerate's figure is weights-only by construction (it ignores batch and sequence length):
the float32 row for fp32 modes, the float16 row (mixed precision) for the bf16 modes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque

import torch
from hf_decode import LLAMA_SHAPES
from modes import VARIANTS as MODES_VARIANTS
from modes import device_name
from variants import add_variant_arguments, write_results

from apt_model.optimization.config import MODES
from apt_model.storage import human_bytes

MODELS = ("apt", "llama", "gpt2")
# modes.py's variants the estimator can name, by estimator mode
ESTIMATED = {variant: "off" if variant == "fp32-eager" else variant.removeprefix("vb-")
             for variant in MODES_VARIANTS if variant == "fp32-eager" or variant.startswith("vb-")}
VARIANTS = tuple(f"{model}/{variant}" for model in MODELS for variant in ESTIMATED)
MIXED = ("balanced", "memory", "full")  # the modes that compute in bf16 (accelerate's float16 row)
# --scale full: the APT preset of --preset, Llama-3.2-1B's shape (hf_decode.py), GPT-2 small;
# --scale tiny: two-layer models of the same families, for the CPU smoke test.
TINY = {
    "apt": dict(d_model=64, n_layers=2, n_heads=4, d_ff=128),
    "llama": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4),
}


def model_config(name: str, args: argparse.Namespace):
    """The config of model ``name`` at ``--scale``, long enough for the longest ``--seqs``."""
    longest = max(_ints(args.seqs))
    if name == "apt":
        from apt_model.modeling.apt_model import APTConfig

        shape = TINY["apt"] if args.scale == "tiny" else {}
        return APTConfig.from_preset(args.preset, vocab_size=args.vocab, max_seq_len=longest, **shape)
    import transformers

    if name == "llama":
        shape = TINY["llama"] if args.scale == "tiny" else dict(vocab_size=128256, **LLAMA_SHAPES["llama-1b"])
        return transformers.LlamaConfig(max_position_embeddings=longest, **shape)
    shape = TINY["gpt2"] if args.scale == "tiny" else {}
    return transformers.GPT2Config(n_positions=max(longest, 1024), **shape)


def build(config, device: torch.device | str) -> torch.nn.Module:
    """The model of ``config`` on ``device`` (seeded random weights), the way the estimator builds it."""
    from apt_model.modeling.apt_model import APTConfig, APTModel

    torch.manual_seed(0)
    with torch.device(device):
        if isinstance(config, APTConfig):
            return APTModel(config)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config)


def accelerate_figure(config, mode: str) -> int | None:
    """accelerate ``estimate-memory``'s "Training using Adam" for this model (its float16 row
    for the bf16 modes, float32 otherwise), through its Python API; None without accelerate."""
    try:
        from accelerate.commands.estimate import estimate_training_usage
        from accelerate.utils import calculate_maximum_sizes
    except ImportError:
        return None
    total, _largest = calculate_maximum_sizes(build(config, "meta"))
    return int(max(estimate_training_usage(total, "float16" if mode in MIXED else "float32").values()))


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def emit(message: dict) -> None:
    """One JSON line on stdout for the parent process (``run_variants``), at once."""
    print(json.dumps(message), flush=True)


def run_variant(args: argparse.Namespace) -> None:
    """One model in one mode: its header, then predicted and real peak for every batch ×
    sequence length, each emitted as soon as it is known."""
    import apt_model.optimization.vb_global as vb
    from apt_model.estimator import Traced, measure

    name, variant = args.variant.split("/")
    mode = ESTIMATED[variant]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = model_config(name, args)
    shapes = [(b, s) for b in _ints(args.batches) for s in _ints(args.seqs)]
    started = time.perf_counter()
    traced = Traced(config, mode=mode, training=True, device=device.type, base=None)
    build_s = time.perf_counter() - started

    model = build(config, device)
    if mode != "off":
        vb.optimize(model, mode=mode, verbose=False)
    model.train()
    emit({"header": {"model": name, "mode": mode, "estimate_build_s": build_s,
                     "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                     "accelerate": accelerate_figure(config, mode)}})
    if cuda:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if mode != "off" and MODES[mode].offload_optimizer:  # the mode's one documented line, as modes.py
            opt = vb.offload_optimizer(model, opt)
        vocab = config.vocab_size

        def step(batch: int, seq: int) -> None:
            x = torch.randint(0, vocab, (batch, seq), device=device)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()

        step(*min(shapes))  # the optimizer state exists from here on, as in the traced step
    for batch, seq in shapes:
        started = time.perf_counter()
        est = traced.step(batch=batch, seq=seq)
        row = {"batch": batch, "seq": seq, "predicted": est.traced_peak, "predicted_components": est.at_peak,
               "estimate_s": time.perf_counter() - started}
        try:
            if cuda:
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                step(batch, seq)
                torch.cuda.synchronize()
                row["measured"] = torch.cuda.max_memory_allocated(device)
                row["reserved"] = torch.cuda.max_memory_reserved(device)
            else:
                row["measured"] = measure(model, batch=batch, seq=seq, optimizer="adamw",
                                          device_type="cpu").traced_peak
            row["error"] = row["predicted"] / row["measured"] - 1
        except torch.cuda.OutOfMemoryError:
            row["measured"] = "OOM"
        emit({"row": row})


def run_variants(args: argparse.Namespace, payload: dict) -> list[dict]:
    """Each of ``--only`` in a fresh subprocess (``--variant``), its lines read as they come:
    every row is printed and ``payload`` (its "results" the list returned) written to
    ``--json`` at once. A variant that fails keeps the rows it finished and gains "error"."""
    results = payload["results"]
    forwarded = ("device", "scale", "preset", "vocab", "batches", "seqs")
    for variant in args.only:
        result: dict = {"variant": variant, "rows": []}
        results.append(result)
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={getattr(args, k)}" for k in forwarded]
        other: deque[str] = deque(maxlen=3)  # the last lines that are not messages: a failure's
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "VB_LANG": "en"}) as proc:
            for line in proc.stdout:
                if not line.startswith("{"):
                    other.append(line.strip())
                    continue
                message = json.loads(line)
                if "header" in message:
                    result.update(message["header"])
                else:
                    result["rows"].append(message["row"])
                    print(markdown([{**result, "rows": [message["row"]]}], "", header=False), flush=True)
                write_results(args.json, payload)
        if proc.returncode != 0:
            result["error"] = list(other)
            print(f"{variant}: {' '.join(result['error'])}", flush=True)
            write_results(args.json, payload)
    return results


def cuda_runtime(device: torch.device) -> dict[str, int]:
    """What this process holds on the card beside its tensors, with nothing else running on it:
    ``context`` = used device memory (total − free) right after CUDA initializes, and
    ``loaded`` = used less the allocator's reserved bytes after an fp32 and a bf16 cuBLAS
    product and one Triton FP4 kernel (their libraries and modules loaded)."""
    from apt_model.fp4 import fp4_linear, quantize_nvfp4

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info(device)
    context = total - free
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256, device=device, dtype=dtype)
        (a @ a).sum().item()
    weight = quantize_nvfp4(torch.randn(256, 256, device=device))
    fp4_linear(torch.randn(1, 256, device=device, dtype=torch.bfloat16), weight).sum().item()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"context": context, "loaded": total - free - torch.cuda.memory_reserved(device)}


def size(value: int | str | None) -> str:
    return "-" if value is None else value if isinstance(value, str) else human_bytes(value, 2)


def markdown(results: list[dict], measured_by: str, header: bool = True) -> str:
    """One line per model, mode, batch and sequence length (and one per failed variant),
    under a table header unless ``header`` is False."""
    lines = [f"| model | mode | batch | seq | predicted | {measured_by} | error | reserved | accelerate (Adam) |",
             "|---|---|---|---|---|---|---|---|---|"] if header else []
    for r in results:
        for row in r["rows"]:
            error = f"{100 * row['error']:+.1f}%" if "error" in row else "-"
            lines.append(f"| {r['model']} | {r['mode']} | {row['batch']} | {row['seq']} | {size(row['predicted'])} | "
                         f"{size(row['measured'])} | {error} | {size(row.get('reserved'))} | {size(r.get('accelerate'))} |")
        if "error" in r:
            lines.append(f"| {r['variant']} | ERROR {' '.join(r['error'])} | | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full",
                        help="full: APT --preset, Llama-3.2-1B and GPT-2 small shapes; tiny: two-layer models")
    parser.add_argument("--preset", default="large", help="the APT preset (--scale full)")
    parser.add_argument("--vocab", type=int, default=50304, help="the APT model's vocabulary")
    parser.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes")
    parser.add_argument("--seqs", default="256,1024", help="comma-separated sequence lengths")
    add_variant_arguments(parser, VARIANTS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return
    measured_by = "max_memory_allocated" if args.device == "cuda" else "tracked (CPU)"
    payload = {"device": device_name(args.device), "args": vars(args), "date": time.strftime("%Y-%m-%d"),
               "measured_by": measured_by, "results": []}
    if args.device == "cuda":
        payload["runtime"] = cuda_runtime(torch.device("cuda"))
        print(f"CUDA runtime: {', '.join(f'{k} {human_bytes(v)}' for k, v in payload['runtime'].items())}", flush=True)
    results = run_variants(args, payload)
    print(f"\n{device_name(args.device)} torch {torch.__version__}\n")
    print(markdown(results, measured_by))
    if all(r.get("accelerate") is None for r in results):
        print("\naccelerate is not installed here: its column is empty (pip install accelerate)")
    errors = [abs(row["error"]) for r in results for row in r["rows"] if "error" in row]
    if errors:
        print(f"\nlargest |error| {100 * max(errors):.1f}% over {len(errors)} steps; "
              f"within ±10%: {sum(e <= 0.10 for e in errors)}, within ±5%: {sum(e <= 0.05 for e in errors)}")


if __name__ == "__main__":
    main()
