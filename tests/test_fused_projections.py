"""Sibling FP4 projections (q/k/v, gate/up) multiplied as one: same results as the members
alone (one row and several), no second copy of the weights, undone by ``vb.restore``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model.fp4.fused import FusedFP4Projections
from apt_model.fp4.layer import FP4Linear
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization.fused_projections import fuse_projections
from apt_model.storage import module_nbytes

FORMATS = ("nvfp4", "mxfp4")


def apt(fmt: str, freeze: bool = True) -> APTModel:
    torch.manual_seed(0)
    model = APTModel(APTConfig.from_preset("tiny", vocab_size=256))
    vb.optimize(model, mode="speed", fp4_format=fmt, verbose=False)
    if freeze:
        vb.freeze_fp4(model)
    return model.eval()


def groups(model: nn.Module) -> list[FusedFP4Projections]:
    return [m for m in model.modules() if isinstance(m, FusedFP4Projections)]


def unfused(model: nn.Module) -> nn.Module:
    for group in groups(model):
        group.active = False
    return model


class Siblings(nn.Module):
    """q/k/v over one input, or (cross=True) k/v over another, as encoder-decoder attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(64, n, bias=True) for n in (64, 96, 128))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if memory is None else memory
        return torch.cat([self.q_proj(x), self.k_proj(kv), self.v_proj(kv)], dim=-1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_decoding_matches_the_members_alone(fmt):
    model, reference = apt(fmt), unfused(apt(fmt))
    report = model._vb_report
    assert report.fused_projections == len(groups(model)) == 2 * len(model.blocks)
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.generate(prompt, 16, do_sample=False)
        assert torch.equal(tokens, reference.generate(prompt, 16, do_sample=False))
        one_row = tokens[:, -1:]
        torch.testing.assert_close(model(one_row).logits, reference(one_row).logits, rtol=1e-5, atol=1e-5)
    assert all(g.active and g._pending.input is None for g in groups(model))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_few_rows_are_one_product_and_a_prompt_runs_the_members_alone(fmt):
    """Up to SMALL_MAX_M rows (batched decoding): one call of the group's product, each
    member's output its columns, equal to the member alone. A longer prompt runs the members
    alone: a cache keeping a view of one member's output would keep the whole product."""
    from apt_model.fp4.kernel_plan import SMALL_MAX_M

    model, reference = apt(fmt), unfused(apt(fmt))
    calls = []
    for group in groups(model):
        group._fused_weight = (lambda f: lambda: calls.append(1) or f())(group._fused_weight)
    for rows, fused_calls in ((2 * 9, len(groups(model))), (SMALL_MAX_M + 1, 0)):
        calls.clear()
        prompt = torch.randint(0, 256, (1, rows), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(model(prompt).logits, reference(prompt).logits, rtol=1e-5, atol=1e-5)
        assert len(calls) == fused_calls, rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_members_hold_views_of_the_group_and_the_state_is_unchanged(fmt):
    model = apt(fmt)
    for group in groups(model):
        storage = group.packed.untyped_storage().data_ptr()
        for member in group.members:
            assert member.weight_packed.untyped_storage().data_ptr() == storage
            assert member.weight_scales.untyped_storage().data_ptr() == group.scales.untyped_storage().data_ptr()
    state = model.state_dict()
    assert not any("vb_fused" in key for key in state)
    # Each storage once: the members' packed rows live in the group's tensors; the per-row
    # NVFP4 tensor scales (4 bytes a row) are the only extra.
    extra = sum(g.tensor_scale.numel() * 4 for g in groups(model) if g.tensor_scale is not None)
    plain = apt(fmt, freeze=False)
    for name, group in list(plain.named_modules()):
        if isinstance(group, FusedFP4Projections):
            group.release()
            parent, _, child = name.rpartition(".")
            delattr(plain.get_submodule(parent), child)
    vb.freeze_fp4(plain)
    assert module_nbytes(model) == module_nbytes(plain) + extra


def test_replaced_member_weights_are_packed_again():
    model = apt("nvfp4")
    block = model.blocks[0].attn
    x = torch.randn(1, 1, block.q_proj.in_features)
    new = FP4Linear(nn.Linear(block.k_proj.in_features, block.k_proj.out_features, bias=False)).freeze()
    block.k_proj.load_state_dict(new.state_dict())  # in place: the group's rows change too
    with torch.no_grad():
        torch.testing.assert_close(block.k_proj(x), new(x))
        block.v_proj.weight_packed = block.v_proj.weight_packed.clone().fill_(0x22)  # replaced
        group = groups(block)[0]
        fused_v = [block.q_proj(x), block.k_proj(x), block.v_proj(x)][2]
        assert group.active
        unfused(block)
        torch.testing.assert_close(fused_v, block.v_proj(x))
    assert block.v_proj.weight_packed.untyped_storage().data_ptr() == group.packed.untyped_storage().data_ptr()


def test_members_reading_different_inputs_run_alone():
    torch.manual_seed(0)
    model = Siblings()
    reference = Siblings()
    reference.load_state_dict(model.state_dict())
    vb.optimize(model, mode="speed", verbose=False)
    vb.freeze_fp4(model)
    vb.optimize(reference, mode="speed", verbose=False)
    vb.freeze_fp4(unfused(reference))
    x, memory = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        assert groups(model)[0].active
        torch.testing.assert_close(model(x, memory), reference(x, memory), rtol=1e-5, atol=1e-5)
        assert not groups(model)[0].active  # k/v read another input: the group stopped fusing
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_groups_pack_only_once_every_member_is_frozen_and_restore_removes_them():
    model = apt("nvfp4", freeze=False)
    assert groups(model) and all(g.packed is None for g in groups(model))
    x = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        before = model(x).logits
    vb.freeze_fp4(model)
    assert all(g.packed is not None for g in groups(model))
    vb.restore(model)
    assert not groups(model)
    assert not any(isinstance(m, FP4Linear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)


def test_moving_the_model_keeps_the_members_linked_and_scales_uncast():
    model = apt("nvfp4")
    model.to(torch.float64)  # a dtype change: packed tensors and scales must not be cast
    for group in groups(model):
        assert group.scales.dtype == torch.float8_e4m3fn and group.tensor_scale.dtype == torch.float32
        assert group._linked()
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 1))).logits.dtype == torch.float64


def test_moving_the_model_copies_the_fused_rows_once():
    """A move copies each byte of the model once: the members' rows go with their group."""
    model = apt("nvfp4")
    copied = []
    moved: set[int] = set()  # storages "on the target"

    def copy(t: torch.Tensor) -> torch.Tensor:  # as .to(device): a copy unless already there
        if t.untyped_storage().data_ptr() in moved:
            return t
        out = t.clone()
        copied.append(out.untyped_storage().nbytes())
        moved.add(out.untyped_storage().data_ptr())
        return out

    before = module_nbytes(model)
    model._apply(copy)
    assert sum(copied) == before == module_nbytes(model)
    assert all(group._linked() for group in groups(model))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 1)))


def test_apt_bottleneck_down_projection_joins_the_qkv_product():
    """``ap_down`` (d -> ap_rank, below ``fp4_min_features``) rides in q/k/v's product, unless
    it or its siblings stay out of FP4."""
    model = apt("nvfp4")
    attn = model.blocks[0].attn
    assert isinstance(attn.ap_down, FP4Linear) and type(attn.ap_up) is nn.Linear
    assert attn.ap_down._fused is attn.q_proj._fused
    assert attn.q_proj._fused.sizes == [128, 128, 128, 16]
    for skip in (("*.ap_down",), ("*.k_proj",)):
        torch.manual_seed(0)
        plain = APTModel(APTConfig.from_preset("tiny", vocab_size=256))
        vb.optimize(plain, mode="speed", fp4_skip=skip, verbose=False)
        attn = plain.blocks[0].attn
        assert type(attn.ap_down) is nn.Linear
        assert (attn.q_proj._fused is None) == (skip == ("*.k_proj",))


def test_fusing_twice_or_mismatched_siblings_is_refused():
    model = Siblings()
    vb.optimize(model, mode="speed", verbose=False)
    made, _ = fuse_projections(model)
    assert made == 0  # the engine's group already holds the members
    with pytest.raises(ValueError):
        FusedFP4Projections([model.q_proj])


def test_speed_mode_model_with_fused_groups_compiles_whole():
    model = apt("nvfp4")
    x = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        eager = model(x).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert all(g._pending.input is None and g._pending.outputs == [] for g in groups(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_kernels_on_cuda_match_the_members_alone(fmt):
    """The fused GEMV (per-row tensor scales) and the direct relaunches of compiled kernels."""
    def build() -> APTModel:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = APTModel(APTConfig.from_preset("tiny", vocab_size=256)).to(torch.bfloat16)
        vb.optimize(model, mode="speed", fp4_format=fmt, verbose=False)
        vb.freeze_fp4(model)
        return model.eval()

    model, reference = build(), unfused(build())
    prompt = torch.randint(0, 256, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        first = model.generate(prompt, 24, do_sample=False)  # the JIT launches, then direct ones
        assert torch.equal(model.generate(prompt, 24, do_sample=False), first)
        # The members alone sum in another split of K: the same logits up to rounding (greedy
        # tokens of a random model can flip on that), checked on the generated sequence.
        torch.testing.assert_close(model(first).logits, reference(first).logits, rtol=2e-2, atol=2e-2)
        one_row = first[:, -1:]
        torch.testing.assert_close(model(one_row).logits, reference(one_row).logits, rtol=2e-2, atol=2e-2)
        for rows in (5, 200):  # the group's small-kernel product; the members alone (prefill)
            many = torch.randint(0, 256, (1, rows), device="cuda")
            torch.testing.assert_close(model(many).logits, reference(many).logits, rtol=2e-2, atol=2e-2)


def test_packing_a_group_frees_the_members_own_packed_tensors():
    model = apt("nvfp4", freeze=False)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 1)))  # the members' packed weights cached for inference
    vb.freeze_fp4(model)
    for group in groups(model):  # no cache holds tensors the group's concatenation replaced
        storage = group.packed.untyped_storage().data_ptr()
        for member in group.members:
            assert member._packed is None or member._packed.packed.untyped_storage().data_ptr() == storage


def test_a_dtype_change_casts_the_group_bias_with_the_members():
    torch.manual_seed(0)
    model, reference = Siblings(), Siblings()
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        vb.optimize(m, mode="speed", verbose=False)
        vb.freeze_fp4(m)
    unfused(reference)
    model.to(torch.float64)
    reference.to(torch.float64)
    group = groups(model)[0]
    assert group.bias.dtype == model.q_proj.bias.dtype == torch.float64
    assert group.scales.dtype == torch.float8_e4m3fn
    x = torch.randn(1, 1, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-9)
