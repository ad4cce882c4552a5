"""Speed mode's graphed ``generate()`` for Hugging Face models: which calls it takes, that it
returns Hugging Face's greedy tokens (stops and pads at end-of-sequence tokens like it), and
that everything else goes to Hugging Face's ``generate``."""

from __future__ import annotations

import copy

import pytest
import torch

import apt_model.optimization.vb_global as vb
from apt_model.optimization import graphed_decode
from apt_model.optimization.engine import report_of
from apt_model.optimization.graphed_decode import greedy_call, padded_like_greedy_search

transformers = pytest.importorskip("transformers")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(device: str = "cpu", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=1024)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = 0
    return model.eval()


def ids(batch: int = 1, length: int = 7, device: str = "cpu") -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(length)).to(device)


def test_speed_mode_attaches_it_and_restore_takes_it_away():
    model = tiny_llama()
    vb.optimize(model, mode="speed", verbose=False)
    assert report_of(model).graphed_decode and "generate" in model.__dict__
    vb.restore(model)
    assert "generate" not in model.__dict__ and graphed_decode.ATTR not in model.__dict__
    plain = tiny_llama()
    vb.optimize(plain, mode="balanced", verbose=False)
    assert not report_of(plain).graphed_decode
    assert "generate" not in plain.__dict__


def test_calls_on_the_cpu_go_to_hugging_face():
    model = tiny_llama()
    prompt = ids()
    want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    vb.optimize(model, mode="speed", verbose=False)
    vb.freeze_fp4(model)
    decoder = model.__dict__[graphed_decode.ATTR]
    got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert got.shape == want.shape and not decoder.steps
    assert torch.equal(got, decoder.hf_generate(prompt, max_new_tokens=6, do_sample=False))


def test_steps_are_forgotten_when_weights_move_and_not_copied():
    model = tiny_llama()
    vb.optimize(model, mode="speed", verbose=False)
    decoder = model.__dict__[graphed_decode.ATTR]
    decoder.forget_stale_steps()
    decoder.steps[(1, 256)] = "captured"
    decoder.forget_stale_steps()
    assert decoder.steps  # nothing moved
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # in place: the graphs read the new values
    decoder.forget_stale_steps()
    assert decoder.steps
    vb.freeze_fp4(model)  # packed buffers replace the master weights
    decoder.forget_stale_steps()
    assert not decoder.steps
    decoder.steps[(1, 256)] = "captured"
    model.to(torch.float64)
    decoder.forget_stale_steps()
    assert not decoder.steps
    decoder.steps[(1, 256)] = "captured"
    copied = copy.deepcopy(model)
    assert not copied.__dict__[graphed_decode.ATTR].steps and decoder.steps
    assert copied.__dict__[graphed_decode.ATTR].model is copied
    assert copied.generate.__self__ is copied.__dict__[graphed_decode.ATTR]
    prompt = ids()
    assert torch.equal(copied.generate(prompt, max_new_tokens=4, do_sample=False),
                       model.generate(prompt, max_new_tokens=4, do_sample=False))


def test_greedy_calls_are_taken_and_the_rest_are_not():
    config = tiny_llama().generation_config
    prompt = ids(2, 5)
    call = greedy_call(prompt, None, config, {"max_new_tokens": 9})
    assert call is not None and call.new == 9 and call.eos == (config.eos_token_id,) and call.pad == 0
    assert greedy_call(prompt, torch.ones_like(prompt), config, {"max_length": 12}).new == 7
    listed = greedy_call(prompt, None, config, {"max_new_tokens": 3, "eos_token_id": [5, 6],
                                                "pad_token_id": None})
    assert listed.eos == (5, 6) and listed.pad == 5  # Hugging Face pads with the first one
    static = config.__class__(**config.to_dict())
    static.cache_implementation = "static"
    assert greedy_call(prompt, None, static, {"max_new_tokens": 3}) is not None
    refused = [
        {"max_new_tokens": 3, "do_sample": True},
        {"max_new_tokens": 3, "num_beams": 2},
        {"max_new_tokens": 3, "repetition_penalty": 1.3},
        {"max_new_tokens": 3, "min_new_tokens": 2},
        {"max_new_tokens": 3, "return_dict_in_generate": True, "output_scores": True},
        {"max_new_tokens": 3, "streamer": object()},
        {"max_new_tokens": 3, "stopping_criteria": [lambda *a, **k: False]},
        {"max_length": 5},  # no room for a new token after a 5-token prompt
    ]
    for kwargs in refused:
        assert greedy_call(prompt, None, config, kwargs) is None, kwargs
    padded_mask = torch.ones_like(prompt)
    padded_mask[0, 0] = 0
    assert greedy_call(prompt, padded_mask, config, {"max_new_tokens": 3}) is None
    assert greedy_call(prompt.float(), None, config, {"max_new_tokens": 3}) is None


def test_end_of_sequence_tokens_pad_and_cut_like_greedy_search():
    tokens = torch.tensor([[4, 2, 7, 2, 9], [5, 6, 2, 8, 8]])
    # both rows end: cut after the later first end (index 2), pads after each row's end
    assert padded_like_greedy_search(tokens, (2,), 0).tolist() == [[4, 2, 0], [5, 6, 2]]
    # a row that never ends keeps every token; the other is padded
    open_row = torch.tensor([[4, 2, 7, 2], [5, 6, 7, 8]])
    assert padded_like_greedy_search(open_row, (2,), 1).tolist() == [[4, 2, 1, 1], [5, 6, 7, 8]]
    # several end tokens; the first of them in a row ends it
    assert padded_like_greedy_search(torch.tensor([[3, 9, 4, 4]]), (9, 4), 0).tolist() == [[3, 9]]


# ------------------------------------------------------------------------------------ CUDA


def _hf_generate(model, *args, **kwargs):
    return model.__dict__[graphed_decode.ATTR].hf_generate(*args, **kwargs)


@cuda
def test_graphed_greedy_tokens_are_hugging_faces():
    model = tiny_llama("cuda")
    vb.optimize(model, mode="speed", verbose=False)
    vb.freeze_fp4(model)
    model.generation_config.eos_token_id = None
    decoder = model.__dict__[graphed_decode.ATTR]
    for batch, length, new in ((1, 7, 20), (1, 11, 33), (3, 9, 17)):
        prompt = ids(batch, length, "cuda")
        want = _hf_generate(model, prompt, max_new_tokens=new, do_sample=False)
        got = model.generate(prompt, max_new_tokens=new, do_sample=False)
        assert got.shape == (batch, length + new)
        assert torch.equal(got, want), (batch, length, new)
    assert decoder.failed is None
    assert set(decoder.steps) == {(1, 256), (3, 256)}  # prompts of other lengths share a step
    again = model.generate(ids(1, 7, "cuda"), max_new_tokens=20, do_sample=False)
    assert torch.equal(again, _hf_generate(model, ids(1, 7, "cuda"), max_new_tokens=20, do_sample=False))


@cuda
def test_graphed_generate_stops_and_pads_like_hugging_face():
    model = tiny_llama("cuda")
    vb.optimize(model, mode="speed", verbose=False)
    vb.freeze_fp4(model)
    prompt = ids(2, 6, "cuda")
    model.generation_config.eos_token_id = None
    free = _hf_generate(model, prompt, max_new_tokens=40, do_sample=False)[:, 6:]
    # end-of-sequence tokens that each row meets at a different step, one past a check
    eos = [int(free[0, 3]), int(free[1, 20])]
    for eos_token_id in (eos, eos[1]):
        want = _hf_generate(model, prompt, max_new_tokens=40, do_sample=False,
                            eos_token_id=eos_token_id, pad_token_id=1)
        got = model.generate(prompt, max_new_tokens=40, do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=1)
        assert torch.equal(got, want), (eos_token_id, got, want)
    assert model.__dict__[graphed_decode.ATTR].steps


@cuda
def test_sampling_on_the_gpu_goes_to_hugging_face():
    model = tiny_llama("cuda")
    vb.optimize(model, mode="speed", verbose=False)
    vb.freeze_fp4(model)
    out = model.generate(ids(1, 5, "cuda"), max_new_tokens=4, do_sample=True, top_k=5)
    assert out.shape == (1, 9) and not model.__dict__[graphed_decode.ATTR].steps
