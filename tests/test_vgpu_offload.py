"""Training with offloaded optimizer state (``vb.offload_optimizer``) on the CPU: the same losses
and parameters as ``torch.optim.AdamW(fused=True)`` bit for bit (the host step is torch's
fused CPU AdamW), with lr schedulers, clipping, resident parameters and bf16 compute copies;
state_dict round trips and resumes exactly; the counters match a hand count; what is not
supported is a one-line error."""

from __future__ import annotations

import copy
import io
import shutil

import pytest
import torch
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model.errors import VBConfigError, VBUnsupportedError
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.vgpu.levels import HOST_ALIGN as ALIGN
from apt_model.vgpu.offload import OffloadedAdamW as Offloaded

CFG = APTConfig.from_preset("tiny", n_layers=2)
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


pytestmark = pytest.mark.usefixtures("english")  # messages in English (conftest)


def apt(dtype: torch.dtype = torch.float32) -> APTModel:
    torch.manual_seed(0)
    return APTModel(CFG).to(dtype).train()


def groups(model: nn.Module) -> list[dict]:
    """The trainers' groups: weight decay on matrices only."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (2, 16), generator=g) for _ in range(n)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, xs: list[torch.Tensor], clip: float | None = None,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    """The user's loop, unchanged (clipping on the device when ``clip``)."""
    losses = []
    for x in xs:
        loss = model(x, labels=x).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def warmup(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))


def test_offloaded_training_equals_fused_adamw_bit_for_bit_and_counts_what_moved():
    reference, model = apt(), apt()
    xs = batches(5)
    ref_opt = torch.optim.AdamW(groups(reference), fused=True, **HYPER)
    expected = train(reference, ref_opt, xs, scheduler=warmup(ref_opt))
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(groups(model), **HYPER))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert train(model, optimizer, xs, scheduler=warmup(optimizer)) == expected
    assert same_params(model, reference)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert all(p.grad is None for p in model.parameters())

    s = vb.get_stats()["vgpu"]["optimizers"][0]
    params = list(model.parameters())
    nbytes = sum(p.nbytes for p in params)
    aligned = sum(-(-p.nbytes // ALIGN) * ALIGN for p in params)
    assert (s["params"], s["param_bytes"], s["steps"]) == (len(params), nbytes, len(xs))
    assert s["grad_bytes_off"] == s["weight_bytes_back"] == len(xs) * nbytes  # every parameter, every step
    assert s["host_bytes"] == 4 * aligned  # master, transfer, exp_avg, exp_avg_sq (fp32 model)
    assert s["host_step_s"] > 0 and s["wait_s"] >= 0 and s["overlap"] and not s["pinned"]
    assert "offloaded optimizer: " in vb._stats().render(vb.get_stats())


def test_clipping_and_resident_parameters_equal_the_device_loop():
    reference, model = apt(), apt()
    xs = batches(4)
    ref_opt = torch.optim.AdamW(groups(reference), fused=True, **HYPER)
    expected = train(reference, ref_opt, xs, clip=0.5)
    first = next(model.parameters())  # stays on the device, stepped there by fused AdamW
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(groups(model), fused=True, **HYPER),
                                     params=[p for p in model.parameters() if p is not first], max_grad_norm=0.5)
    assert train(model, optimizer, xs) == expected and same_params(model, reference)
    s = optimizer.stats()
    assert s["params"] == len(list(model.parameters())) - 1 and not s["overlap"]
    ours, theirs = optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[i][k], v) for i in theirs for k, v in theirs[i].items())


def test_bf16_compute_copies_follow_fp32_masters():
    """The device holds bf16 weights; the host steps fp32 masters with fp32 gradients: what a
    fp32 master model stepped by fused AdamW gives, cast to bf16, step by step."""
    model = apt(torch.bfloat16)
    master = apt()  # the same init in fp32
    with torch.no_grad():
        for p, q in zip(master.parameters(), model.parameters(), strict=True):
            p.copy_(q.float())  # start from the bf16 weights
    ref_opt = torch.optim.AdamW(groups(master), fused=True, **HYPER)
    compute = copy.deepcopy(model)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(groups(model), **HYPER))
    for x in batches(3):
        compute(x, labels=x).loss.backward()
        for p, q in zip(master.parameters(), compute.parameters(), strict=True):
            p.grad = q.grad.float()
        ref_opt.step()
        compute.zero_grad()
        with torch.no_grad():
            for p, q in zip(master.parameters(), compute.parameters(), strict=True):
                q.copy_(p)
        model(x, labels=x).loss.backward()
        optimizer.step()
        assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and same_params(model, compute)
    state = optimizer.state_dict()["state"]
    in_groups = [p for g in ref_opt.param_groups for p in g["params"]]  # state_dict numbers them so
    assert all(torch.equal(state[i]["master"], p) for i, p in enumerate(in_groups))
    assert all(state[i]["exp_avg"].dtype == torch.float32 for i in state)


def test_state_dict_round_trip_resumes_bit_for_bit():
    xs = batches(6)
    model = apt()
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(groups(model), **HYPER))
    train(model, optimizer, xs[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    reference = apt()
    ref_opt = torch.optim.AdamW(groups(reference), fused=True, **HYPER)
    train(reference, ref_opt, xs[:3])
    saved = ref_opt.state_dict()
    ours = optimizer.state_dict()
    assert [{**g, "fused": True} for g in ours["param_groups"]] == saved["param_groups"]  # AdamW's format
    assert all(torch.equal(ours["state"][i][k], v) for i in saved["state"] for k, v in saved["state"][i].items())
    expected = train(model, optimizer, xs[3:])

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = apt()
    torch.manual_seed(5)  # a different init, overwritten by the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = vb.offload_optimizer(resumed, torch.optim.AdamW(groups(resumed), **HYPER))
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert train(resumed, resumed_opt, xs[3:]) == expected and same_params(resumed, model)
    plain = apt()  # and a plain AdamW resumes from it too
    plain.load_state_dict(checkpoint["model"])
    plain_opt = torch.optim.AdamW(groups(plain), fused=True, **HYPER)
    plain_opt.load_state_dict(checkpoint["optimizer"])
    for group in plain_opt.param_groups:
        group["fused"] = True  # the host step's implementation (the loaded groups say None)
    assert train(plain, plain_opt, xs[3:]) == expected


def test_zero_grad_semantics():
    model = apt()
    first = next(model.parameters())
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(groups(model), **HYPER),
                                     params=[p for p in model.parameters() if p is not first])
    x = batches(1)[0]
    model(x, labels=x).loss.backward()
    assert first.grad is not None and all(p.grad is None for p in model.parameters() if p is not first)
    with pytest.raises(VBUnsupportedError, match=r"zero_grad\(\) between backward and optimizer.step\(\)") as err:
        optimizer.zero_grad()
    assert "\n" not in str(err.value)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    assert torch.count_nonzero(first.grad) == 0
    optimizer.zero_grad()
    assert first.grad is None

    clipped = apt()
    optimizer = vb.offload_optimizer(clipped, torch.optim.AdamW(groups(clipped), **HYPER), max_grad_norm=1.0)
    before = [p.detach().clone() for p in clipped.parameters()]
    clipped(x, labels=x).loss.backward()
    optimizer.zero_grad()  # not stepped yet: the gradients that came off are dropped
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(clipped.parameters(), before, strict=True))
    assert optimizer.stats()["weight_bytes_back"] == 0


@pytest.mark.parametrize(("make", "message"), [
    (lambda ps: torch.optim.SGD(ps, lr=0.1), "torch.optim.AdamW only; got torch.optim.sgd.SGD"),
    (lambda ps: torch.optim.Adam(ps), "torch.optim.AdamW only; got torch.optim.adam.Adam"),
    (lambda ps: torch.optim.AdamW(ps, amsgrad=True), r"does not support amsgrad=True \(param group 0\)"),
])
def test_unsupported_optimizers_are_one_line_errors(make, message):
    model = apt()
    with pytest.raises(VBUnsupportedError, match=message) as err:
        vb.offload_optimizer(model, make(model.parameters()))
    assert "\n" not in str(err.value)


def test_what_an_overlapped_step_cannot_honour_is_refused():
    model = apt()
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(groups(model), **HYPER))
    x = batches(1)[0]
    model(x, labels=x).loss.backward()
    with pytest.raises(VBUnsupportedError, match=r"backward 2 before optimizer.step\(\), after the host steps started; "
                                                 r"for gradient accumulation pass .*accumulate="):
        model(x, labels=x).loss.backward()
    optimizer.param_groups[0]["lr"] = 1.0
    with pytest.raises(VBUnsupportedError, match=r"changed between backward and optimizer.step\(\) \(\(0.003, "):
        optimizer.step()
    with pytest.raises(VBConfigError, match="already offloaded by another optimizer; call its release"):
        vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))
    optimizer.release()
    again = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters()))
    assert isinstance(again, Offloaded)


def test_vb_trainer_offloads_and_resumes_bit_for_bit(tmp_path):
    """VB's trainer with host levels configured: zero added lines, clipping in step(), and a
    resumed run equal to the uninterrupted one."""
    from apt_model.training.trainer import TrainConfig, Trainer

    level0 = "cuda:0" if torch.cuda.is_available() else "cpu"  # the device the trainer picks
    vb.enable(mode="balanced", mixed_precision=False, fused_attention=False, fused_loss=False, verbose=False,
              vgpu_config={"levels": [{"capacity_mb": 64, "device": level0, "speed_gbps": 100},
                                      {"capacity_mb": 64, "device": "cpu", "speed_gbps": 50}]})
    cfg = TrainConfig(max_steps=6, save_interval=3, eval_interval=0, out_dir=str(tmp_path / "run"), batch_size=4,
                      seq_len=16, eval_batches=1, sample_tokens=4, progress=False, warmup=2)
    full = Trainer(cfg, lambda: APTModel(CFG)).run()
    optimizers = vb.get_stats()["vgpu"]["optimizers"]
    assert optimizers and optimizers[-1]["steps"] == 6 and not optimizers[-1]["overlap"]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "ckpt-00000006")
    cfg.resume = True
    resumed = Trainer(cfg, lambda: APTModel(CFG)).run()
    assert resumed.losses == full.losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_level0_other_than_the_models_device_is_refused():
    """A model on the GPU with Level 0 on the CPU: one clear error, nothing moved."""
    from apt_model import vgpu
    from apt_model.optimization.config import VGPULevel as Level

    model = apt().cuda()
    stack = vgpu.attach(model, list(model.blocks), [Level(64, "cpu", 100), Level(64, "cpu", 50)])
    with pytest.raises(VBConfigError, match="levels.0. is cpu but the model is on cuda:0"):
        stack.place()
    assert all(p.is_cuda for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_on_cuda_equals_fused_adamw_on_the_host(monkeypatch):
    """On a GPU (pinned host state, gradients off and weights back on side streams): the
    same losses and weights as the model stepped by fused AdamW on CPU copies of the same
    gradients, with and without clipping, and the counters count every parameter.
    Deterministic kernels, so that two backwards give the same gradients bit for bit."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _cuda_equality()
    finally:
        torch.use_deterministic_algorithms(False)


def _cuda_equality() -> None:
    for clip in (None, 0.5):
        model = apt().cuda()
        compute = copy.deepcopy(model)
        master = copy.deepcopy(model).cpu()
        ref_opt = torch.optim.AdamW(groups(master), fused=True, **HYPER)
        optimizer = vb.offload_optimizer(model, torch.optim.AdamW(groups(model), **HYPER), max_grad_norm=clip)
        for x in batches(4):
            x = x.cuda()
            expected = compute(x, labels=x).loss
            expected.backward()
            for p, q in zip(master.parameters(), compute.parameters(), strict=True):
                p.grad = q.grad.cpu()
            if clip:
                torch.nn.utils.clip_grad_norm_(master.parameters(), clip)
            ref_opt.step()
            compute.zero_grad()
            with torch.no_grad():
                for p, q in zip(master.parameters(), compute.parameters(), strict=True):
                    q.copy_(p)
            loss = model(x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            assert loss.item() == expected.item() and same_params(model, compute)
        s = optimizer.stats()
        assert s["pinned"] and s["grad_bytes_off"] == 4 * s["param_bytes"] and s["wait_s"] >= 0


def test_full_mode_fp4_layers_train_with_the_offloaded_optimizer_bit_for_bit():
    """Full mode's FP4 layers (master weights re-quantized each step) under the offloaded
    optimizer: the same losses and weights as fused AdamW on the same model, since a new
    master's version tells its layer to quantize again."""
    vb.enable(mode="full", verbose=False)
    reference, model = apt(), apt()
    vb.optimize(reference)
    vb.optimize(model)
    assert any(type(m).__name__ == "FP4Linear" for m in model.modules())
    xs = batches(4)
    expected = train(reference, torch.optim.AdamW(groups(reference), fused=True, **HYPER), xs)
    assert train(model, vb.offload_optimizer(model, torch.optim.AdamW(groups(model), **HYPER)), xs) == expected
    assert same_params(model, reference)
    assert len(set(expected)) == len(expected)  # it trains: the losses move


def test_full_mode_offloads_the_optimizer_on_an_accelerator(monkeypatch):
    """The ``offload_optimizer`` switch: on in mode full only, honoured on an accelerator
    (faked here), never on the CPU, and an explicit setting wins over the mode; host levels
    below Level 0 offload in any mode."""
    import apt_model.accelerator as accelerator
    from apt_model.optimization.config import VBConfig, VGPUConfig, VGPULevel

    assert not vb.offloads_training(VBConfig(mode="full", device="cpu"))
    monkeypatch.setattr(accelerator, "resolve_device", lambda name: torch.device("cuda", 0))
    assert vb.offloads_training(VBConfig(mode="full"))
    assert not vb.offloads_training(VBConfig(mode="full", offload_optimizer=False))
    assert not any(vb.offloads_training(VBConfig(mode=m)) for m in ("balanced", "memory", "speed"))
    assert vb.offloads_training(VBConfig(mode="memory", offload_optimizer=True))
    levels = VGPUConfig((VGPULevel(1024, "cuda:0", 1000), VGPULevel(1024, "cpu", 50)))
    assert vb.offloads_training(VBConfig(mode="balanced", vgpu_config=levels))
    assert not vb.offloads_training(None)
