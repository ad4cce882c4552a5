"""A Llama-3-8B-shaped Hugging Face checkpoint (random bf16 weights, sharded safetensors)
loaded straight into FP4 on the card with ``vb.load_pretrained_fp4``: peak card memory, peak
host memory, time, and the greedy tokens against the bf16 load + ``vb.optimize`` + freeze path.

    python bench/hf_fp4_load.py --folder /dev/shm/llama8b --json bench/results/hf-fp4-load.json

Steps, each in a fresh subprocess (peak figures of one step only): ``write`` builds the model
on the card and saves it with ``save_pretrained`` (5 GB shards); ``stream`` loads it with
``vb.load_pretrained_fp4``; ``reference`` loads it with ``from_pretrained`` in bf16, then
``vb.optimize(mode="speed")`` + ``vb.freeze_fp4``. Both report 16 greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from hf_decode import always_n_tokens, build_llama
from variants import write_results


def _tokens(model) -> list[int]:
    prompt = torch.arange(1, 17, device="cuda")[None]
    with torch.inference_mode():
        return always_n_tokens(model).generate(prompt, max_new_tokens=16, do_sample=False)[0, 16:].tolist()


def step(name: str, folder: str) -> dict:
    import transformers

    import apt_model.optimization.vb_global as vb
    from apt_model.storage import module_nbytes

    start = time.perf_counter()
    if name == "write":
        build_llama("llama-8b", "cuda").save_pretrained(folder, max_shard_size="5GB")
        return {"step": name, "seconds": time.perf_counter() - start,
                "files": sorted(os.listdir(folder))}
    if name == "stream":
        model = vb.load_pretrained_fp4(folder, device="cuda", verbose=False)
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                              device_map={"": 0})
        vb.optimize(model, mode="speed", verbose=False)
        vb.freeze_fp4(model)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"step": name, "seconds": seconds, "model_bytes": module_nbytes(model),
            "peak_card_bytes": torch.cuda.max_memory_allocated(),
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens": _tokens(model)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", default="/dev/shm/llama8b")
    parser.add_argument("--step", choices=("write", "stream", "reference"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.folder)))
        return
    rows = []
    for name in ("write", "stream", "reference"):
        proc = subprocess.run([sys.executable, __file__, "--step", name, "--folder", args.folder],
                              capture_output=True, text=True, env={**os.environ, "VB_LANG": "en"})
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                    else {"step": name, "error": proc.stderr.strip().splitlines()[-3:]})
        print(rows[-1], flush=True)
    stream, reference = (r for r in rows[1:])
    if "tokens" in stream and "tokens" in reference:
        print(f"tokens equal: {stream['tokens'] == reference['tokens']}")
    write_results(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
