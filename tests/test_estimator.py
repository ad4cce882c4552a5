"""``vb.estimate``: the traced step against a real CPU model, and the ``vb estimate`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

from apt_model.cli import main
from apt_model.errors import run_cli
from apt_model.estimator import (
    MemoryTracker,
    Traced,
    decode_contexts,
    decode_sweep,
    estimate,
    measure,
)
from apt_model.estimator.attention import EFFICIENT, FLASH, MATH, cuda_attention, cuda_kernel
from apt_model.estimator.estimate import cache_keyword, cache_tensors, mode_config
from apt_model.estimator.fit import FIT_MARGIN, largest_batch, smallest_fit
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization import config as vb_config
from apt_model.optimization import engine
from apt_model.storage import human_bytes

CONFIG = APTConfig.from_preset("tiny", n_layers=2, max_seq_len=64)
BATCH, SEQ = 2, 64
PEAK_TOLERANCE = 0.05
ROOT = Path(__file__).resolve().parents[1]  # traced peak vs the same tracker on a real CPU step


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def real_model(mode: str) -> APTModel:
    torch.manual_seed(0)
    model = APTModel(CONFIG)
    if mode != "off":
        engine.optimize(model, mode_config(mode))
    return model


def test_tracker_counts_a_storage_once_and_frees_it_with_its_last_view():
    with MemoryTracker() as tracker:
        a = torch.empty(1000)
        view = a[10:]
        b = torch.empty(500, dtype=torch.float16)
        assert tracker.current == 4000 + 1000
        del a
        assert tracker.current == 5000  # the view keeps the storage
        del view, b
    assert tracker.current == 0 and tracker.peak == 5000


@pytest.mark.parametrize(("mode", "optimizer"), [("off", "adamw"), ("memory", "adamw"), ("speed", "sgd")])
def test_parameter_gradient_and_optimizer_bytes_are_exact(mode, optimizer):
    model = real_model(mode)
    opt = (torch.optim.AdamW(model.parameters()) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-3))
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    params = list(model.parameters())
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]

    est = estimate(CONFIG, mode=mode, batch=BATCH, seq=SEQ, optimizer=optimizer, device="cpu")
    assert est.parameter_bytes == nbytes(params)
    assert est.parameters == {"float32": nbytes(params)}
    assert est.gradients == nbytes(p.grad for p in params)
    assert est.optimizer_state == nbytes(state)
    assert (est.optimizer_state > 2 * est.parameter_bytes) == (optimizer == "adamw")  # exp_avg, exp_avg_sq, step


@pytest.mark.parametrize("mode", ["off", "balanced", "memory"])  # FP4: the decode test
def test_traced_peak_agrees_with_a_real_cpu_step(mode):
    real = measure(real_model(mode), batch=BATCH, seq=SEQ, optimizer="adamw", device_type="cpu")
    traced = estimate(CONFIG, mode=mode, batch=BATCH, seq=SEQ, device="cpu")
    assert abs(traced.traced_peak - real.traced_peak) <= PEAK_TOLERANCE * real.traced_peak
    assert abs(traced.activations - real.activations) <= PEAK_TOLERANCE * real.activations
    assert sum(traced.at_peak.values()) == traced.traced_peak
    assert traced.peak_bytes == traced.traced_peak  # no runtime overhead on the CPU


def test_decode_step_agrees_with_a_real_cpu_decode_and_holds_packed_weights():
    model = real_model("speed")
    engine.optimize(model, mode_config("speed"))
    from apt_model.fp4.layer import freeze_fp4

    freeze_fp4(model)
    real = measure(model, batch=BATCH, seq=SEQ, optimizer=None)
    traced = estimate(CONFIG, mode="speed", batch=BATCH, seq=SEQ, training=False, device="cpu")
    assert abs(traced.traced_peak - real.traced_peak) <= PEAK_TOLERANCE * real.traced_peak
    assert traced.parameters == real.parameters and "nvfp4 packed" in traced.parameters
    plain = estimate(CONFIG, mode="off", batch=BATCH, seq=SEQ, training=False, device="cpu")
    assert traced.parameter_bytes < plain.parameter_bytes
    assert traced.gradients == traced.optimizer_state == 0


def real_cache_bytes(model, batch: int, context: int, vocab: int) -> int:
    """Bytes of the KV cache a real CPU prefill of ``context - 1`` tokens + one decode step ends with."""
    ids = torch.randint(0, vocab, (batch, context))
    model.eval()
    keyword = cache_keyword(model)
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        out = model(input_ids=ids[:, -1:], use_cache=True, **{keyword: getattr(prefill, keyword)})
    return nbytes(cache_tensors(getattr(out, keyword)))


def test_decode_contexts_double_from_512_to_the_longest():
    assert decode_contexts(3000) == [512, 1024, 2048, 3000]
    assert decode_contexts(1024) == [512, 1024]
    assert decode_contexts(100) == [100]


@pytest.mark.parametrize("mode", ["balanced", "speed"])
def test_decode_sweep_kv_cache_is_the_real_cache_of_an_apt_model(mode, native_bf16):
    config = APTConfig.from_preset("tiny", n_layers=2, max_seq_len=600)
    rows = decode_sweep(config, mode=mode, batch=BATCH, device="cpu")
    assert [row.seq for row in rows] == [512, 600]
    torch.manual_seed(0)
    model = APTModel(config)
    engine.optimize(model, mode_config(mode))
    for row in rows:
        real = real_cache_bytes(model, BATCH, row.seq, config.vocab_size)
        element = 2 if mode == "balanced" else 4  # bf16 autocast, or fp32
        assert row.kv_cache == real == 2 * config.n_layers * BATCH * row.seq * config.d_model * element
        assert row.kv_cache < row.peak_bytes and row.at_peak["kv_cache"] <= row.kv_cache
    assert rows[0].parameters == rows[1].parameters


# bytes of a key and of a value element: fp32; under bf16 autocast the values are bf16 and the
# keys fp32 (HF's rotary tables follow the fp32 hidden states, and bf16 · fp32 is fp32)
@pytest.mark.parametrize(("mode", "element"), [("off", 4 + 4), ("balanced", 4 + 2)])
def test_decode_sweep_kv_cache_of_an_hf_llama(mode, element, native_bf16):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    (row,) = decode_sweep(cfg, mode=mode, batch=BATCH, device="cpu")
    model = transformers.LlamaForCausalLM(cfg)
    if mode != "off":
        engine.optimize(model, mode_config(mode))
    real = real_cache_bytes(model, BATCH, 96, cfg.vocab_size)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = cfg.num_hidden_layers * BATCH * cfg.num_key_value_heads * 96 * head_dim * element
    assert row.kv_cache == real == kv_bytes


def test_checkpointing_cuts_the_activation_peak():
    by_mode = {mode: estimate(CONFIG, mode=mode, batch=4, seq=SEQ, device="cpu") for mode in ("off", "balanced", "memory")}
    assert by_mode["memory"].activations < by_mode["balanced"].activations < by_mode["off"].activations
    assert by_mode["memory"].traced_peak < by_mode["off"].traced_peak


def test_a_module_is_traced_on_a_copy_and_left_untouched():
    model = real_model("off")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    est = estimate(model, mode="memory", batch=BATCH, seq=SEQ, device="cpu")
    assert est.parameter_bytes == nbytes(model.parameters())
    assert engine.report_of(model) is None
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.grad is None and torch.equal(p, before[name])


def test_a_cuda_estimate_needs_no_cuda_and_adds_the_stated_overhead():
    from apt_model.estimator import CUDA_RUNTIME_OVERHEAD

    # two tokens: the optimizer step, not the activations, makes the peak
    cpu = estimate(CONFIG, mode="off", batch=1, seq=2, device="cpu")
    cuda = estimate(CONFIG, mode="off", batch=1, seq=2, device="cuda")
    assert cpu.runtime_overhead == 0 and cuda.runtime_overhead == CUDA_RUNTIME_OVERHEAD > 0
    assert cuda.peak_bytes == cuda.traced_peak + CUDA_RUNTIME_OVERHEAD
    tensors = 3 * len(list(APTModel(CONFIG).parameters()))  # exp_avg, exp_avg_sq, step
    # the same state, each tensor in an allocator block (rounded up to 512 bytes)
    assert cpu.optimizer_state <= cuda.optimizer_state < cpu.optimizer_state + 512 * tensors
    assert cuda.traced_peak > cpu.traced_peak  # AdamW's multi-tensor path holds more temporaries


def test_hf_llama_config_and_its_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    real = transformers.LlamaForCausalLM(cfg)
    est = estimate(cfg, mode="balanced", batch=BATCH, seq=SEQ, device="cpu")
    assert est.parameter_bytes == nbytes(real.parameters())
    assert est.optimizer_state == 2 * est.parameter_bytes + 4 * len(list(real.parameters()))
    cfg.save_pretrained(tmp_path)
    from_file = estimate(str(tmp_path / "config.json"), mode="balanced", batch=BATCH, seq=SEQ, device="cpu")
    assert from_file.traced_peak == est.traced_peak


def vb(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """``vb`` run in this process through the entry point's error handling: (exit code, out, err)."""
    monkeypatch.setenv("VB_LANG", "en")
    code = run_cli(main, args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_one_table_per_mode(capsys, monkeypatch):
    code, out, err = vb(capsys, monkeypatch, "estimate", "--preset", "tiny", "--seq", "8", "--mode", "all",
                        "--optimizer", "sgd")
    assert code == 0, err
    for mode in (*vb_config.MODES, "off"):
        assert f"mode {mode} · training (sgd)" in out
    peaks = [line for line in out.splitlines() if line.split()[:1] == ["peak"]]
    assert len(peaks) == len(vb_config.MODES) + 1 and all("MiB" in line for line in peaks)


def test_cli_decode_prints_a_table_by_context(capsys, monkeypatch):
    code, out, err = vb(capsys, monkeypatch, "estimate", "--preset", "tiny", "--decode", "--mode", "speed")
    assert code == 0, err
    context = APTConfig.from_preset("tiny").max_seq_len
    rows = [line.split() for line in out.splitlines()[2:]]
    assert out.splitlines()[0].endswith("mode speed · decode · batch 1 · cpu")
    assert [int(row[0]) for row in rows] == decode_contexts(context)


@pytest.mark.parametrize(("args", "needle"), [
    (["--preset", "gigantic"], "gigantic"),
    (["--hf-config", "/no/such/config.json"], "/no/such/config.json"),
    (["--preset", "tiny", "--batch", "0"], "batch"),
    (["--preset", "tiny", "--seq", "-3"], "seq"),
    (["--preset", "tiny", "--mode", "turbo"], "turbo"),
    (["--preset", "tiny", "--optimizer", "lion"], "lion"),
    (["--preset", "tiny", "--seq", "100000"], "100000"),
    (["--preset", "tiny", "--decode", "--seq", "100000"], "100000"),
    (["--preset", "tiny", "--memory", "lots"], "lots"),
    (["--preset", "tiny", "--memory=0GiB"], "0GiB"),
    (["--hf-config", "{tmp}/broken.json"], "broken.json"),
    (["--hf-config", "{tmp}"], "{tmp}"),
    ([], "--preset"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(capsys, monkeypatch, tmp_path, args, needle):
    if any("{tmp}" in a for a in args):
        pytest.importorskip("transformers")
    (tmp_path / "broken.json").write_text('{"model_type": "llama", "hidden_size": ')
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    needle = needle.replace("{tmp}", str(tmp_path))
    code, out, err = vb(capsys, monkeypatch, "estimate", *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and out == "", err
    assert lines[0].startswith("error:")


def test_cli_memory_budget_says_what_fits(capsys, monkeypatch):
    small = estimate("tiny", mode="balanced", seq=8, optimizer="sgd", device="cpu").peak_bytes
    code, out, err = vb(capsys, monkeypatch, "estimate", "--preset", "tiny", "--seq", "8", "--optimizer", "sgd",
                        "--mode", "balanced", "--memory", str(2 * small))
    assert code == 0 and out.rstrip().endswith(f"fits (--memory {human_bytes(2 * small)})"), err


def test_smallest_fit_names_a_mode_else_the_largest_batch_of_the_last_mode(monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    def peak(mode: str, batch: int) -> int:
        return estimate(CONFIG, mode=mode, batch=batch, seq=SEQ, optimizer="sgd", device="cpu").peak_bytes

    def smallest(free: int, batch: int) -> str | None:
        return smallest_fit(CONFIG, free=free, batch=batch, seq=SEQ, training=True, optimizer="sgd", device="cpu",
                            base=None)

    # balanced does not fit where memory (checkpointing) just does
    assert smallest(int(peak("memory", 4) / (1 - FIT_MARGIN)) + 1, 4) == "mode memory with batch 4"
    full_at_2, full_at_3 = peak("full", 2), peak("full", 3)
    assert smallest(int((full_at_2 + full_at_3) / 2 / (1 - FIT_MARGIN)), 16) == "mode full with batch 2"


def test_cli_a_mode_that_cannot_fit_is_one_line_naming_what_would(capsys, monkeypatch):
    code, out, err = vb(capsys, monkeypatch, "estimate", "--preset", "tiny", "--seq", "8", "--mode", "off",
                        "--optimizer", "sgd", "--memory", "1KiB")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "mode off does not fit" in err and err.rstrip().endswith("nothing fits, not even batch 1 in any mode")


def test_largest_batch_is_exact_and_takes_few_traces():
    traced = Traced(CONFIG, mode="off", training=True, device="cpu", base=None)
    calls: list[int] = []

    def step(batch: int):
        calls.append(batch)
        return traced.step(batch=batch, seq=32, optimizer="sgd")

    free = int(step(37).peak_bytes / (1 - FIT_MARGIN)) + 1
    calls.clear()
    best = largest_batch(step, free, 5000)
    assert best == 37 and len(calls) <= 8, calls
    assert largest_batch(step, 1, 5000) == 0


def test_cli_plot_draws_one_stacked_bar_per_mode(capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "modes.png"
    code, out, err = vb(capsys, monkeypatch, "estimate", "--preset", "tiny", "--seq", "8", "--mode", "all",
                        "--optimizer", "sgd", "--plot", str(png))
    assert code == 0 and out.rstrip().endswith(f"memory estimate plot: {png}"), err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_plot_without_matplotlib_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = vb(capsys, monkeypatch, "estimate", "--preset", "tiny", "--seq", "8", "--mode", "off",
                        "--optimizer", "sgd", "--plot", str(tmp_path / "modes.png"))
    assert code == 2 and "peak" in out and err.count("\n") == 1, err
    assert 'no memory estimate plot can be drawn; install it with pip install -e ".[plot]"' in err
    assert not (tmp_path / "modes.png").exists()


def test_the_command_runs_as_a_program():
    env = {k: v for k, v in os.environ.items() if k not in vb_config.ENV_VARS}
    proc = subprocess.run([sys.executable, "-m", "apt_model.cli", "estimate", "--preset", "nano"], capture_output=True,
                          text=True, env={**env, "VB_LANG": "en", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nano" in proc.stderr


def korthikanti_layer_activations(seq: int, batch: int, hidden: int, heads: int) -> int:
    """Bytes of activations one GPT layer keeps for its backward pass in 16-bit precision,
    without recomputation or flash attention (Korthikanti et al., "Reducing Activation
    Recomputation in Large Transformer Models", 2022, eq. 1): 34·s·b·h + 5·a·s²·b."""
    return 34 * seq * batch * hidden + 5 * heads * seq**2 * batch


# The closed form models the kernels of Megatron; PyTorch's eager GPT-2 keeps a little more
# (about 2·s·b·h + a·s²·b a layer at this shape: Conv1D's reshaped inputs, the causal mask
# select). Traced must be at least the closed form and at most 15% above it.
CLOSED_FORM_TOLERANCE = 0.15


def test_traced_activations_of_a_plain_fp16_gpt2_layer_against_the_closed_form():
    transformers = pytest.importorskip("transformers")
    seq, batch, hidden, heads = 256, 2, 256, 4

    def traced(layers: int) -> int:
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=seq, n_embd=hidden, n_layer=layers, n_head=heads,
                                      activation_function="gelu", attn_implementation="eager")
        with torch.device("meta"):
            model = transformers.GPT2LMHeadModel(cfg).to(torch.float16)
        return estimate(model, mode="off", batch=batch, seq=seq, optimizer="sgd", device="cpu").activations

    per_layer = traced(2) - traced(1)  # what one more layer adds: embeddings, logits and loss cancel
    closed = korthikanti_layer_activations(seq, batch, hidden, heads)
    assert closed <= per_layer <= (1 + CLOSED_FORM_TOLERANCE) * closed, (per_layer, closed)


# ---- the attention kernel of the target device ---------------------------------------------------


@pytest.mark.parametrize(("dtype", "seq", "lse_rows", "rng_bytes"), [
    (torch.bfloat16, 64, 64, 3 * 8),  # flash: a logsumexp per row; philox seed pair and offset, uint64
    (torch.float32, 40, 64, 2 * 8),  # memory-efficient: rows padded to a multiple of 32; seed, offset int64
])
def test_a_cuda_target_counts_the_fused_kernel_not_the_attention_weights(dtype, seq, lse_rows, rng_bytes):
    batch, heads, head_dim = 2, 4, 16
    with FakeTensorMode(), cuda_attention():
        q, k, v = (torch.empty(batch, heads, seq, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.empty(batch, heads, seq, head_dim, dtype=dtype)
        with MemoryTracker() as tracker:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
            forward = tracker.current
            out.backward(grad)
    element = batch * heads * seq * head_dim * q.element_size()
    assert forward == element + batch * heads * lse_rows * 4 + rng_bytes  # output, fp32 logsumexp, rng state
    # after backward: the output and the gradients of q, k and v; the logsumexp freed with the graph
    assert tracker.current == 4 * element and q.grad is not None


@pytest.mark.parametrize(("dtype", "kv_heads", "mask", "kernel"), [
    (torch.bfloat16, 4, False, FLASH),
    (torch.bfloat16, 2, False, FLASH),  # grouped heads: flash takes them (enable_gqa)
    (torch.bfloat16, 4, True, EFFICIENT),  # flash takes no mask
    (torch.float32, 4, False, EFFICIENT),  # flash takes no fp32
    (torch.float32, 2, False, MATH),  # fp32 with grouped heads: the s × s weights are kept
])
def test_cuda_kernel_follows_the_dispatcher(dtype, kv_heads, mask, kernel):
    q = torch.empty(2, 4, 32, 64, dtype=dtype)
    kv = torch.empty(2, kv_heads, 32, 64, dtype=dtype)
    attn_mask = torch.ones(32, 32, dtype=torch.bool) if mask else None
    assert cuda_kernel(q, kv, kv, attn_mask, is_causal=not mask, enable_gqa=True) == kernel


def test_a_cuda_target_gpt2_layer_has_no_quadratic_attention_term():
    transformers = pytest.importorskip("transformers")

    def per_layer(seq: int, device: str) -> int:
        def traced(layers: int) -> int:
            cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=seq)
            return estimate(cfg, mode="off", batch=2, seq=seq, optimizer="sgd", device=device).activations
        return traced(2) - traced(1)

    # fp32 with dropout: the CPU keeps the attention weights (s²); CUDA's memory-efficient
    # kernel keeps O(s), plus its philox seed and offset (two int64, an allocator block each) a layer
    from apt_model.estimator.tracker import cuda_block_bytes

    assert 2 * per_layer(64, "cuda") - per_layer(128, "cuda") == 2 * cuda_block_bytes(8)
    assert per_layer(128, "cpu") - 2 * per_layer(64, "cpu") > 0


def test_the_cpu_target_is_a_real_cpu_training_step_to_the_byte():
    """The step a training loop writes (``model(...).loss.backward()``: the logits dropped
    before backward; then AdamW), counted on a real Hugging Face GPT-2 (sdpa, dropout on)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=4096, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    state = [t for s in opt.state.values() for t in s.values()]
    with MemoryTracker() as tracker:
        tracker.add([*model.parameters(), *model.buffers(), *state, ids])
        tracker.reset_peak()
        step()
    est = estimate(cfg, mode="off", batch=BATCH, seq=SEQ, device="cpu")
    assert est.traced_peak == tracker.peak
    logits = BATCH * SEQ * cfg.vocab_size * 4
    assert est.logits_loss == logits + 4 and est.at_peak["logits_loss"] == 4  # freed before the peak


def test_a_gradient_summed_from_two_uses_is_counted_as_autograd_sums_it_in_place():
    """A weight used twice (tied embeddings): without a dispatch mode autograd adds its second
    gradient into the first in place; under the tracker's mode (and on fake tensors) it adds out
    of place. Both the traced and the tracked step count the in-place sum, to the byte: the
    peak holds the weight and two vocabulary-sized gradients, not three."""
    transformers = pytest.importorskip("transformers")

    w = torch.randn(16, 16, requires_grad=True)
    uses = [torch.randn(4, 16) @ w for _ in range(2)]
    seen: list[int] = []
    for y in uses:
        y.grad_fn.register_hook(lambda grads, _out: seen.extend(g.data_ptr() for g in grads if g is not None))
    sum(y.sum() for y in uses).backward()
    assert w.grad.data_ptr() in seen  # summed into one of the two gradients: in place

    seq = 8
    cfg = transformers.GPT2Config(vocab_size=32768, n_embd=64, n_layer=1, n_head=4, n_positions=seq)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, cfg.vocab_size, (1, seq))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    with MemoryTracker() as tracker:
        tracker.add([*model.parameters(), *model.buffers(), ids])
        tracker.reset_peak()
        step()
    est = estimate(cfg, mode="off", batch=1, seq=seq, device="cpu", optimizer="sgd")
    embedding = cfg.vocab_size * cfg.n_embd * 4
    assert est.traced_peak == tracker.peak < 3.5 * embedding


def test_activations_at_the_peak_are_broken_down_by_block_and_temporaries(monkeypatch):
    """``activations_at_peak`` splits the activations live at the peak by where they were
    allocated, and sums to them. Without checkpointing each block keeps its own saved
    activations (identical blocks, equal bytes); with it (memory mode) the blocks keep less
    than one block did: only the recomputed one holds its activations. The table prints the
    split, one line for all blocks past four."""
    monkeypatch.setenv("VB_LANG", "en")
    cfg = APTConfig.from_preset("tiny", n_layers=3, max_seq_len=64)
    plain, checkpointed = (estimate(cfg, mode=mode, batch=2, seq=64, device="cpu", optimizer="sgd")
                           for mode in ("off", "memory"))
    for est in (plain, checkpointed):
        assert sum(est.activations_at_peak.values()) == est.at_peak["activations"]
        assert est.activations_at_peak["backward"] > 0 and est.activations_at_peak["forward"] > 0
    sites = plain.activations_at_peak
    assert sites["block 0"] == sites["block 1"] > 0 and list(sites)[:3] == ["block 0", "block 1", "block 2"]
    blocks = sum(n for label, n in checkpointed.activations_at_peak.items() if label.startswith("block "))
    assert 0 < blocks < sites["block 0"]
    table = plain.table()
    assert "    block 0 " in table and "    backward temporaries " in table
    deep = estimate(APTConfig.from_preset("tiny", n_layers=6, max_seq_len=64), mode="off", batch=2, seq=64,
                    device="cpu", optimizer="sgd")
    assert "    6 blocks (largest: block 0) " in deep.table()


def test_a_cuda_target_counts_the_caching_allocators_blocks():
    """``torch.cuda.max_memory_allocated`` counts allocator blocks: requests rounded up to 512
    bytes, and from 10 MiB up a 2 MiB-rounded segment kept whole when at most 1 MiB of it
    would be left. A CUDA target's trace counts each storage so; a CPU target's counts bytes."""
    from apt_model.estimator.tracker import cuda_block_bytes

    mib = 1 << 20
    assert [cuda_block_bytes(n) for n in (0, 1, 513, 5 * mib + 1)] == [0, 512, 1024, 5 * mib + 512]
    assert cuda_block_bytes(11 * mib) == 12 * mib  # 1 MiB left: not split
    assert cuda_block_bytes(23 * mib // 2) == 12 * mib
    assert cuda_block_bytes(10 * mib + 512) == 10 * mib + 512  # nearly 2 MiB left: split off
    cuda = estimate(CONFIG, mode="off", batch=BATCH, seq=SEQ, device="cuda")
    cpu = estimate(CONFIG, mode="off", batch=BATCH, seq=SEQ, device="cpu")
    params = [p for p in APTModel(CONFIG).parameters()]
    assert cuda.at_peak["parameters"] == sum(cuda_block_bytes(p.nbytes) for p in params)
    assert cpu.at_peak["parameters"] == sum(p.nbytes for p in params) == cpu.parameter_bytes
