"""Speed-mode models compile whole with ``torch.compile(fullgraph=True)``: no graph break at
the FP4 layers (their packed-weight cache is skipped inside compiled code), and the compiled
model gives the eager model's logits bit for bit. ``aot_eager`` traces exactly what inductor
would receive, without compiling C++ on the CPU."""

from __future__ import annotations

import pytest
import torch

import apt_model.optimization.vb_global as vb
from apt_model.modeling.apt_model import APTConfig, APTModel


def compiled_logits_match(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> None:
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, **kwargs).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, **kwargs).logits
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_speed_mode_apt_model_compiles_whole(frozen, fmt):
    torch.manual_seed(0)
    model = vb.optimize(APTModel(APTConfig.from_preset("tiny")), mode="speed", fp4_format=fmt,
                        verbose=False).eval()
    if frozen:
        vb.freeze_fp4(model)
    compiled_logits_match(model, torch.randint(0, 256, (1, 16)))


def test_speed_mode_hugging_face_model_compiles_whole():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config).eval()
    vb.optimize(model, mode="speed", fp4_min_features=32, verbose=False)
    assert vb.get_stats()["layers"]["fp4"] == 14
    vb.freeze_fp4(model)
    compiled_logits_match(model, torch.randint(0, 256, (1, 16)), use_cache=False)


@pytest.mark.parametrize("frozen", [False, True])
def test_speed_mode_gpt2_compiles_whole(frozen):
    """GPT-2's Conv1D projections in FP4 (their [in, out] weights used transposed)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    vb.optimize(model, mode="speed", verbose=False)
    assert vb.get_stats()["layers"]["fp4"] == 8
    if frozen:
        vb.freeze_fp4(model)
    compiled_logits_match(model, torch.randint(0, 256, (1, 16)), use_cache=False)


def test_fused_groups_stay_one_product_in_compiled_graphs():
    """Inside ``torch.compile`` a frozen Llama's q/k/v and gate/up groups each run as one FP4
    op (4 a decoder layer, not 7); the members' columns pass through the module's dict, which
    is empty again after the call, so a second call reuses the graph (no recompile), and the
    logits equal eager ones bit for bit. A member given another tensor than its group's first
    member runs alone, with the same result as eagerly."""
    transformers = pytest.importorskip("transformers")
    from apt_model.fp4 import layer as fp4_layer

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config).eval()
    vb.optimize(model, mode="speed", fp4_min_features=32, verbose=False)
    vb.freeze_fp4(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randint(0, 256, (1, 8))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        eager = model(x, use_cache=False).logits
        for _ in range(2):
            assert torch.equal(compiled(x, use_cache=False).logits, eager)
    assert len(graphs) == 1 and not fp4_layer.TRACED_GROUP_OUTPUTS
    ops = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "fp4_linear" in str(n.target)]
    assert len(ops) == 4 * config.num_hidden_layers

    attn = model.model.layers[0].self_attn
    group = attn.q_proj._fused
    h = torch.randn(1, 8, 64)
    pair = torch.compile(lambda a, b: (attn.q_proj(a), attn.k_proj(b)), fullgraph=True,
                         backend="aot_eager")
    with torch.no_grad():
        alone = (attn.q_proj.to_plain()(h), attn.k_proj.to_plain()(h))
        for _ in range(3):  # the second call finds k's columns untaken: the group stops
            q, k = pair(h, h.clone())
            assert torch.allclose(q, alone[0], atol=1e-5) and torch.allclose(k, alone[1], atol=1e-5)
    assert not group.active and not fp4_layer.TRACED_GROUP_OUTPUTS


def _decode_step_graph(model: torch.nn.Module, config, device: str = "cpu",
                       inductor: bool = False) -> tuple[torch.fx.GraphModule, torch.Tensor,
                                                        torch.Tensor]:
    """The Dynamo graph of ``model``'s one-token step after a prompt (static cache), and the
    compiled (by inductor, or running the graph as traced) and eager logits of that step."""
    transformers = pytest.importorskip("transformers")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        if inductor:
            from torch._inductor import compile_fx

            return compile_fx.compile_fx(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    prompt = torch.randint(0, 256, (1, 6), device=device)
    token = torch.randint(0, 256, (1, 1), device=device)
    position = torch.tensor([6], device=device)
    logits = []
    with torch.no_grad():
        for run in (model, torch.compile(model, fullgraph=True, backend=backend)):
            cache = transformers.StaticCache(config=config, max_cache_len=16)
            model(prompt, past_key_values=cache, cache_position=torch.arange(6, device=device),
                  use_cache=True)
            logits.append(run(token, past_key_values=cache, cache_position=position,
                              position_ids=position[None], use_cache=True).logits)
    return graphs[0], logits[1], logits[0]


def _tiny_bf16_llama(device: str = "cpu"):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config).eval().bfloat16().to(device)
    vb.optimize(model, mode="speed", fp4_min_features=32, verbose=False)
    vb.freeze_fp4(model)
    return model, config


def test_compiled_decode_step_makes_the_norms_inside_the_fp4_products():
    """One-token steps of a frozen speed-mode Llama, compiled: each RMSNorm before an FP4 group
    is made inside that product (one ``fp4_rms_norm_linear`` op), so once unused nodes are
    dropped, as inductor drops them, only the final norm (before the bf16 lm_head) computes an
    rsqrt of its own; the logits are the eager model's bit for bit (on CPU both run the
    reference formulas)."""
    model, config = _tiny_bf16_llama()
    graph, compiled, eager = _decode_step_graph(model, config)
    assert torch.equal(compiled, eager)
    graph.graph.eliminate_dead_code()
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert sum("fp4_rms_norm_linear" in t for t in targets) == 2 * config.num_hidden_layers
    assert sum("fp4_linear" in t for t in targets) == 2 * config.num_hidden_layers  # o, down
    assert sum("rsqrt" in t for t in targets) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_decode_step_on_cuda_is_the_eager_step():
    """On CUDA, compiled by inductor (the norms' own kernels dropped, the GEMVs normalizing
    their rows): the eager step's logits within bf16 roundings."""
    model, config = _tiny_bf16_llama("cuda")
    graph, compiled, eager = _decode_step_graph(model, config, "cuda", inductor=True)
    assert sum("fp4_rms_norm_linear" in str(n.target) for n in graph.graph.nodes) == 4
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2,
                               atol=2e-2 * eager.abs().max().item())
