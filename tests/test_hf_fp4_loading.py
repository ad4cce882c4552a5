"""Hugging Face safetensors checkpoints loaded straight into FP4 (``vb.load_pretrained_fp4``):
the same model as ``from_pretrained`` + speed mode + ``freeze_fp4``, bit for bit, without the
whole model in host memory (CPU, small sharded checkpoints written by ``save_pretrained``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model.errors import VBConfigError, VBDataError
from apt_model.fp4 import hf_loading
from apt_model.fp4.hf_loading import INDEX_NAME, checkpoint_shards
from apt_model.fp4.layer import FP4Linear
from apt_model.optimization.engine import report_of

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SHARD = "200KB"


def llama_config(**overrides) -> transformers.LlamaConfig:
    """A small Llama with llama3 rope scaling, so that ``inv_freq`` depends on the config."""
    return transformers.LlamaConfig(**{
        "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        **overrides})


def qwen2_config() -> transformers.Qwen2Config:
    """Qwen2: biases on q, k and v (FP4 layers with a bias)."""
    return transformers.Qwen2Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def save(folder: Path, model: nn.Module, shard: str = SHARD) -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def build_and_save(folder: Path, cls: type, config) -> Path:
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # non-zero biases, so that loading them is seen
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return save(folder, model)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sharded checkpoints, saved while VB was off."""
    vb.disable()
    root = tmp_path_factory.mktemp("hf_ckpts")
    return {
        "llama": build_and_save(root / "llama", transformers.LlamaForCausalLM, llama_config()),
        "qwen2": build_and_save(root / "qwen2", transformers.Qwen2ForCausalLM, qwen2_config()),
        "tied": build_and_save(root / "tied", transformers.LlamaForCausalLM,
                               llama_config(tie_word_embeddings=True)),
    }


def reference(path: Path, dtype: torch.dtype, **options) -> nn.Module:
    """The model the usual way: ``from_pretrained``, speed mode, frozen."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    vb.optimize(model, mode="speed", verbose=False, **options)
    vb.freeze_fp4(model)
    return model


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def assert_same_model(loaded: nn.Module, ref: nn.Module) -> None:
    """Same parameters, buffers (non-persistent ones too), values, dtypes, devices, ties."""
    for what in ("named_parameters", "named_buffers"):
        mine = dict(getattr(loaded, what)(remove_duplicate=False))
        theirs = dict(getattr(ref, what)(remove_duplicate=False))
        assert list(mine) == list(theirs)
        for name, tensor in mine.items():
            other = theirs[name]
            assert (tensor.dtype, tensor.device) == (other.dtype, other.device), name
            assert torch.equal(tensor, other), name
    assert list(loaded.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sharded_checkpoint_loads_bit_identical_to_from_pretrained_speed_freeze(checkpoints, arch, dtype):
    path = checkpoints[arch]
    assert (path / INDEX_NAME).is_file() and len(checkpoint_shards(path)) > 3
    model = vb.load_pretrained_fp4(path, dtype=dtype, verbose=False)
    ref = reference(path, dtype)
    assert_same_model(model, ref)
    fp4 = {n: m for n, m in model.named_modules() if isinstance(m, FP4Linear)}
    assert len(fp4) == 2 * 7 and all(m.frozen and m.compute_dtype == dtype for m in fp4.values())
    assert type(model.lm_head) is nn.Linear
    assert not model.training
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    report = report_of(model)
    assert (report.mode, report.fp4_layers, report.fp4_format) == ("speed", 14, "nvfp4")
    assert report.linear_total == report_of(ref).linear_total == 15
    # Same packed weights, same dtype everywhere, the same ops in the same order: the same
    # bits out (eager attention and sdpa alike, as the reference builds it).
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
    if dtype == torch.float32:  # greedy decoding through the KV cache (slow on CPU: once per model)
        prompt, greedy = x[:1, :8], {"max_new_tokens": 5, "do_sample": False}
        assert torch.equal(model.generate(prompt, **greedy), ref.generate(prompt, **greedy))


def test_tied_embeddings_stay_tied_and_plain(checkpoints):
    path = checkpoints["tied"]
    keys = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    assert "lm_head.weight" not in keys  # save_pretrained stores the tied weight once
    model = vb.load_pretrained_fp4(path, verbose=False, fp4_skip=[])  # lm_head not skipped by name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head) is nn.Linear  # tied: never FP4 (fp4_candidates' rule)
    ref = reference(path, torch.float32, fp4_skip=[])
    assert_same_model(model, ref)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens(1)).logits, ref(input_ids=tokens(1)).logits)


def test_options_and_the_active_configuration_choose_the_fp4_layers(checkpoints):
    path = checkpoints["llama"]
    options = {"fp4_format": "mxfp4", "fp4_skip": ["*.mlp.*", "lm_head"]}
    model = vb.load_pretrained_fp4(path, verbose=False, **options)
    assert_same_model(model, reference(path, torch.float32, **options))
    assert {m.fmt for m in model.modules() if isinstance(m, FP4Linear)} == {"mxfp4"}
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert report_of(model).fp4_layers == 2 * 4
    vb.enable_speed_mode(fp4_format="mxfp4", fp4_min_features=100, verbose=False)
    model = vb.load_pretrained_fp4(path)  # the active configuration: k and v (64 rows) too small
    assert report_of(model).fp4_format == "mxfp4"
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, FP4Linear)} \
        == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_other_modes_keep_their_switches_and_fp4_is_always_on(checkpoints):
    vb.enable_balanced_mode(verbose=False)  # FP4 off in this mode: the loader turns it on
    model = vb.load_pretrained_fp4(checkpoints["llama"])
    report = report_of(model)
    assert report.mode == "balanced" and report.fp4_layers == 14 and report.attention_fused == 2
    assert report.autocast_linears == 1  # lm_head
    with pytest.raises(VBConfigError, match="fp4=False"):
        vb.load_pretrained_fp4(checkpoints["llama"], fp4=False)


def test_stats_count_it_and_restore_gives_the_dequantized_plain_model(checkpoints):
    model = vb.load_pretrained_fp4(checkpoints["llama"], verbose=False)
    stats = vb.get_stats()
    assert stats["models"] == 1 and stats["layers"]["fp4"] == 14
    assert stats["param_bytes_after"] < stats["param_bytes_before"] / 3  # fp32 embeddings kept
    x = tokens(2)
    with torch.no_grad():
        before = model(input_ids=x).logits
    vb.restore(model)
    assert report_of(model) is None and vb.get_stats()["models"] == 0
    assert not any(isinstance(m, FP4Linear) for m in model.modules())
    with torch.no_grad():  # dequantize-then-matmul, as the FP4 layers computed off CUDA
        assert torch.equal(model(input_ids=x).logits, before)


def test_one_weight_in_the_compute_dtype_at_a_time(checkpoints, monkeypatch):
    """Whenever a weight is quantized, every other FP4 layer is still on meta or already
    packed: the device holds the FP4 model plus one weight in the compute dtype."""
    built, seen = [], []
    build, quantize = hf_loading._build, hf_loading.fp4_quantize

    def spy_build(*args):
        built.append(build(*args))
        return built[-1]

    def spy_quantize(weight, fmt):
        layers = [m for m in built[0].modules() if isinstance(m, FP4Linear)]
        assert all(m.frozen or m.weight.is_meta for m in layers)
        assert weight.dtype == torch.bfloat16 and not weight.is_meta
        seen.append(sum(m.frozen for m in layers))
        return quantize(weight, fmt)

    monkeypatch.setattr(hf_loading, "_build", spy_build)
    monkeypatch.setattr(hf_loading, "fp4_quantize", spy_quantize)
    vb.load_pretrained_fp4(checkpoints["llama"], dtype=torch.bfloat16, verbose=False)
    assert seen == list(range(14))


def test_base_model_checkpoint_loads_into_the_head_model(tmp_path):
    """A ``GPT2Model`` checkpoint (keys without ``transformer.``, as the Hub's gpt2) into
    ``GPT2LMHeadModel``, its head tied to the embedding; GPT-2's Conv1D layers (weights stored
    ``[in, out]``) packed as speed mode packs them."""
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = save(tmp_path / "gpt2", transformers.GPT2Model(cfg))
    keys = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    assert not any(k.startswith("transformer.") for k in keys)
    model = vb.load_pretrained_fp4(path, transformers.AutoModelForCausalLM, verbose=False)
    assert type(model) is transformers.GPT2LMHeadModel
    assert model.lm_head.weight is model.transformer.wte.weight
    ref = transformers.GPT2LMHeadModel.from_pretrained(path)
    vb.freeze_fp4(vb.optimize(ref, mode="speed", verbose=False))
    assert_same_model(model, ref)
    assert report_of(model).fp4_layers == 4 * cfg.n_layer


def test_single_file_checkpoint_and_a_given_config(checkpoints, tmp_path):
    torch.manual_seed(0)
    path = save(tmp_path / "single", transformers.LlamaForCausalLM(llama_config()), shard="50MB")
    assert checkpoint_shards(path) == [path / "model.safetensors"]
    config = transformers.AutoConfig.from_pretrained(path, attn_implementation="eager")
    model = vb.load_pretrained_fp4(path, config=config, verbose=False)
    assert model.config._attn_implementation == "eager"
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    vb.freeze_fp4(vb.optimize(ref, mode="speed", verbose=False))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens()).logits, ref(input_ids=tokens()).logits)


# ----------------------------------------------------------------------------- errors


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_no_checkpoint_are_data_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    with pytest.raises(VBDataError, match="no such folder"):
        vb.load_pretrained_fp4(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VBDataError, match=r"no safetensors checkpoint \(model.safetensors or "
                                          r"model.safetensors.index.json\)"):
        vb.load_pretrained_fp4(tmp_path / "empty")


def test_a_missing_or_corrupt_shard_is_named(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    path = copy_checkpoint(checkpoints["llama"], tmp_path / "ckpt")
    shards = checkpoint_shards(path)
    shards[1].write_bytes(b"not safetensors")
    with pytest.raises(VBDataError, match=f"{shards[1].name}: not a readable safetensors file"):
        vb.load_pretrained_fp4(path)
    shards[2].unlink()
    with pytest.raises(VBDataError, match=f"names shard {shards[2].name}, which does not exist"):
        vb.load_pretrained_fp4(path)
    (path / INDEX_NAME).write_text("{not json")
    with pytest.raises(VBDataError, match="invalid index file"):
        vb.load_pretrained_fp4(path)


def test_shapes_and_keys_that_do_not_fit_the_config_are_named(checkpoints, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    path = checkpoints["llama"]
    with pytest.raises(VBConfigError, match=r"tensor model\.layers\.\d\.mlp\.\w+_proj\.weight has "
                                            r"shape \[\d+, \d+\], the model's config needs"):
        vb.load_pretrained_fp4(path, config=llama_config(intermediate_size=384))
    with pytest.raises(VBConfigError, match=r"does not fit LlamaForCausalLM: missing "
                                            r"\['model\.layers\.2\."):
        vb.load_pretrained_fp4(path, config=llama_config(num_hidden_layers=3))
    with pytest.raises(VBConfigError, match=r"unexpected \['model-\d+-of-\d+\.safetensors:"
                                            r"model\.layers\.1\."):
        vb.load_pretrained_fp4(path, config=llama_config(num_hidden_layers=1))


def test_bad_dtype_and_unreadable_config_are_config_errors(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("VB_LANG", "en")
    with pytest.raises(VBConfigError, match="invalid compute dtype"):
        vb.load_pretrained_fp4(checkpoints["llama"], dtype=torch.int8)
    path = copy_checkpoint(checkpoints["llama"], tmp_path / "ckpt")
    (path / "config.json").unlink()
    with pytest.raises(VBConfigError, match="cannot read the model config config.json"):
        vb.load_pretrained_fp4(path)


def test_messages_are_chinese_by_default(tmp_path):
    with pytest.raises(VBDataError, match="目录不存在"):
        vb.load_pretrained_fp4(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- host memory

def write_llama(folder: Path, hidden: int, intermediate: int, layers: int, shard: str) -> Path:
    """A Llama with every weight 0.02 (no random init: fast), saved in fp32 shards."""
    cfg = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(0.02)
    return save(folder, model, shard)


# A fresh process loads a tiny checkpoint of the same family first (so the imports, the op
# registration and transformers' caches are in its baseline), then the large one, and prints
# its peak RSS growth and the byte counts.
LOAD = """
import json, resource, sys, torch
import apt_model.optimization.vb_global as vb
from apt_model.fp4 import hf_loading
from apt_model.fp4.format import FP4Weight
from apt_model.fp4.layer import FP4Linear

def stand_in(w, fmt):
    # packed tensors of the real sizes, without the CPU reference quantizer's minutes
    n, k = w.shape
    return FP4Weight(fmt, torch.zeros(n, k // 2, dtype=torch.uint8),
                     torch.zeros(n, k // 16, dtype=torch.float8_e4m3fn),
                     w.abs().amax().float(), (n, k))

hf_loading.fp4_quantize = stand_in
vb.load_pretrained_fp4(sys.argv[1] + "/small", dtype=torch.bfloat16, verbose=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = vb.load_pretrained_fp4(sys.argv[1] + "/big", dtype=torch.bfloat16, verbose=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

fp4 = [m for m in model.modules() if isinstance(m, FP4Linear)]
fp4_model = nbytes([*model.parameters(), *model.buffers()])
packed = nbytes([t for m in fp4 for t in m.packed_weight().state_tensors().values()])
bf16_model = fp4_model - packed + sum(m.plain_weight_nbytes() for m in fp4)
print(json.dumps({"growth": after - before, "fp4_model": fp4_model, "bf16_model": bf16_model}))
"""


def run_python(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("VB_") or k == "ENABLE_VIRTUAL_BLACKWELL")}
    # A fixed mmap threshold: glibc's default raises it as large blocks are freed, then keeps
    # the freed scratch of each weight in a heap that the small packed tensors fragment (RSS
    # about 2x the live bytes here). That is the allocator's caching, not what the loader holds.
    env.update(PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB: Linux")
def test_peak_host_memory_stays_near_the_fp4_model_plus_a_shard(tmp_path):
    """A 57M-parameter Llama in fp32 shards of ~20 MB (227 MB on disk, 113 MB in bf16)
    loads in bf16 growing the peak RSS by less than the FP4 model + 2 shards + 16 MB (the
    modules' Python objects and the allocator's slack): well under the bf16 model (measured:
    53 MB, with a 35 MB FP4 model).

    The quantizer is a stand-in with the real output sizes that still reads every weight:
    this measures what the loader holds. The real CPU quantizer adds its scratch for one
    weight at a time (tens of bytes per element of the largest weight; none on the host
    with the CUDA kernels), and takes minutes here.
    """
    write_llama(tmp_path / "small", 64, 128, 1, "50MB")
    shard = max(p.stat().st_size for p in checkpoint_shards(
        write_llama(tmp_path / "big", 512, 1536, 16, "20MB")))
    got = json.loads(run_python(LOAD, str(tmp_path)))
    bound = got["fp4_model"] + 2 * shard + 16 * 2**20
    assert bound < 0.85 * got["bf16_model"]  # the bound means something
    assert got["growth"] < bound, (got, shard)
