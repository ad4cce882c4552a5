"""``estimate``: the peak memory of one training (or decode) step, measured on fake tensors.

The model is built without data (on the meta device, then given fake CPU tensors of the
same shapes and dtypes), VB's real passes are applied for the mode, and one step runs under
``FakeTensorMode`` with a :class:`MemoryTracker` counting every storage the step allocates
and frees. Fake *CPU* tensors rather than meta ones: autocast applies to CPU tensors but
has no meta policy, so on meta the bf16 modes would trace in fp32.

A training step (forward, loss, backward, optimizer step) starts with the optimizer state
already there, as any step after the first: an optimizer step on zero gradients creates it
beforehand. On a CUDA target, attention runs as CUDA would run it (``attention``), and the
ops CUDA autocast runs in fp32 run in fp32 (``cuda_autocast``). A decode step is a prefill of
``seq - 1`` tokens with the KV cache, then one token; ``decode_sweep`` traces it at several context lengths.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from apt_model.accelerator import resolve_device, supports_bf16
from apt_model.errors import VBConfigError, VBDataError, first_line, positive_int
from apt_model.estimator.attention import cuda_attention
from apt_model.estimator.cuda_autocast import cuda_autocast
from apt_model.estimator.tracker import MemoryTracker, cuda_block_bytes
from apt_model.i18n import tr
from apt_model.optimization import autopatch
from apt_model.optimization.config import MODES, VBConfig, VGPUConfig
from apt_model.optimization.precision import bf16_assumed
from apt_model.storage import human_bytes

if TYPE_CHECKING:
    from apt_model.estimator.levels import ModelPlan, Placement

# What a CUDA process holds on the card outside PyTorch's allocator (its context, the cuBLAS
# and Triton modules it loads) is not traced; this allowance stands for it. Measured on an
# H200 (torch 2.11, CUDA 13): 527-552 MiB right after initialization, 655 MiB once fp32 and
# bf16 cuBLAS products and a Triton FP4 kernel have run (BENCHMARKS.md, "Memory estimator").
# Other cards and drivers differ by tens of MiB; the fitting rule's margin covers that.
CUDA_RUNTIME_OVERHEAD = 656 * 2**20

OFF = "off"
ESTIMATE_MODES = (OFF, *MODES)  # least aggressive first, as MODES
OPTIMIZERS = ("adamw", "sgd")
COMPONENTS = ("parameters", "buffers", "gradients", "optimizer_state", "kv_cache", "activations", "logits_loss")
COMPONENT_NAMES = {  # (Chinese, English)
    "parameters": ("参数", "parameters"),
    "buffers": ("缓冲区与输入", "buffers and inputs"),
    "gradients": ("梯度", "gradients"),
    "optimizer_state": ("优化器状态", "optimizer state"),
    "kv_cache": ("KV 缓存", "KV cache"),
    "activations": ("激活与临时张量", "activations and temporaries"),
    "logits_loss": ("logits 与损失", "logits and loss"),
    "runtime_overhead": ("运行时固定开销", "runtime overhead"),
}
FIRST_DECODE_CONTEXT = 512  # decode_contexts: the shortest context of a sweep (then doubling)


@dataclass(frozen=True)
class Estimate:
    """One step's memory, in bytes.

    ``parameters`` (by dtype; frozen FP4 weights as their packed bytes), ``gradients`` and
    ``optimizer_state`` are what the step holds of each at its end (an offloaded optimizer's
    gradients leave during backward: those live at the peak are in ``at_peak``); ``kv_cache``
    the KV cache a decode step ends with (``seq`` tokens; 0 for training); ``logits_loss`` the loss and logits the
    forward pass returns (a training step drops the logits before its backward pass, as
    ``model(...).loss.backward()`` does); ``activations`` is the largest amount
    of everything else (activations, temporaries) live during the forward and backward
    passes (prefill and decode), beside logits and loss. ``at_peak`` breaks
    ``traced_peak`` down by the same components at the moment of the peak (it sums to it).
    ``activations_at_peak`` breaks ``at_peak["activations"]`` down by where each tensor was
    allocated: ``"block i"`` (the model's i-th repeated block, its forward or its
    recomputation by checkpointing), ``"forward"`` / ``"prefill"`` / ``"decode"`` (outside
    the blocks: embeddings, head, loss), ``"backward"`` (gradient temporaries) and
    ``"optimizer"`` (the step's temporaries).
    ``peak_bytes`` adds the runtime's fixed overhead (``CUDA_RUNTIME_OVERHEAD`` on CUDA, 0
    elsewhere) to the device's peak: the traced one, or with VGPU levels ``placement``'s
    (what the stack puts on each level, and the device's peak with it).
    """

    target: str
    mode: str
    device: str
    batch: int
    seq: int
    optimizer: str | None  # None for a decode step
    parameters: dict[str, int]
    buffers: int
    gradients: int
    optimizer_state: int
    activations: int
    logits_loss: int
    traced_peak: int
    kv_cache: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)
    activations_at_peak: dict[str, int] = field(default_factory=dict)
    runtime_overhead: int = 0
    placement: Placement | None = None

    @property
    def training(self) -> bool:
        return self.optimizer is not None

    @property
    def parameter_bytes(self) -> int:
        return sum(self.parameters.values())

    @property
    def peak_bytes(self) -> int:
        device = self.traced_peak if self.placement is None else self.placement.device_peak
        return device + self.runtime_overhead

    def table(self) -> str:
        """The estimate as a small text table (human-readable sizes)."""
        step = (tr(f"训练 ({self.optimizer})", f"training ({self.optimizer})") if self.training
                else tr("解码", "decode"))
        lines = [tr(f"{self.target} · 模式 {self.mode} · {step} · batch {self.batch} × seq {self.seq} · {self.device}",
                    f"{self.target} · mode {self.mode} · {step} · batch {self.batch} × seq {self.seq} · {self.device}")]
        names = {key: tr(*COMPONENT_NAMES[key]) for key in COMPONENTS}
        totals = {"parameters": self.parameter_bytes, "buffers": self.buffers, "gradients": self.gradients,
                  "optimizer_state": self.optimizer_state, "kv_cache": self.kv_cache,
                  "activations": self.activations, "logits_loss": self.logits_loss}
        lines.append(f"  {tr('组成', 'component'):<28}{tr('总量', 'total'):>12}{tr('峰值时', 'at peak'):>12}")
        for key in COMPONENTS:
            if key == "kv_cache" and self.training:
                continue
            lines.append(f"  {names[key]:<28}{human_bytes(totals[key]):>12}{human_bytes(self.at_peak.get(key, 0)):>12}")
            if key == "parameters" and len(self.parameters) > 1:
                for dtype, nbytes in self.parameters.items():
                    lines.append(f"    {dtype:<26}{human_bytes(nbytes):>12}")
            if key == "activations":
                lines += [f"    {label:<26}{'':>12}{human_bytes(nbytes):>12}"
                          for label, nbytes in _activation_lines(self.activations_at_peak)]
        if self.runtime_overhead:
            lines.append(f"  {tr(*COMPONENT_NAMES['runtime_overhead']):<28}{'':>12}"
                         f"{human_bytes(self.runtime_overhead):>12}")
        if self.placement is not None:
            lines += self.placement.lines()
        lines.append(f"  {tr('峰值', 'peak'):<28}{'':>12}{human_bytes(self.peak_bytes):>12}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


SITE_NAMES = {  # (Chinese, English) for the sites of ``Estimate.activations_at_peak`` outside blocks
    "forward": ("前向 (块外: 嵌入, 头, 损失)", "forward, outside blocks"),
    "prefill": ("预填充 (块外)", "prefill, outside blocks"),
    "decode": ("解码 (块外)", "decode, outside blocks"),
    "backward": ("反向的临时张量", "backward temporaries"),
    "optimizer": ("优化器步骤的临时张量", "optimizer step temporaries"),
}


def _activation_lines(sites: dict[str, int]) -> list[tuple[str, int]]:
    """``activations_at_peak`` as table lines: the blocks holding bytes (one line each, or one
    for all when more than four, with the largest), then the other sites."""
    blocks = {label: n for label, n in sites.items() if label.startswith("block ") and n}
    lines: list[tuple[str, int]] = []
    if len(blocks) > 4:
        largest = max(blocks, key=blocks.__getitem__)
        lines.append((tr(f"{len(blocks)} 个块 (最大: {largest})", f"{len(blocks)} blocks (largest: {largest})"),
                      sum(blocks.values())))
    else:
        lines += [(tr(f"块 {label[6:]}", label), n) for label, n in blocks.items()]
    lines += [(tr(*SITE_NAMES.get(label, (label, label))), n) for label, n in sites.items()
              if n and not label.startswith("block ")]
    return lines


# ---- checks ----------------------------------------------------------------------------------


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise VBConfigError(tr(f"未知的{name} {value!r}; 可用: {', '.join(valid)}",
                               f"unknown {name} {value!r}; valid: {', '.join(valid)}"))
    return value


def _check_step(batch: Any, seq: Any, optimizer: str) -> None:
    positive_int("batch", batch)
    if seq is not None:
        positive_int("seq", seq)
    _check_choice(tr("优化器", "optimizer"), optimizer, OPTIMIZERS)


def _device_type(name: str) -> str:
    """The device type ``name`` stands for ("auto": this machine's), without needing it here."""
    if name == "auto":
        return resolve_device(name).type
    try:
        return torch.device(name).type
    except RuntimeError:
        raise VBConfigError(tr(f"未知设备 {name!r}", f"unknown device {name!r}")) from None


# ---- the model, without data -------------------------------------------------------------------


def fake_copy(model: nn.Module, fake_mode: FakeTensorMode) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake CPU tensors of the same
    shapes, dtypes and ``requires_grad`` (tied ones stay tied); ``model`` and its tensors are
    not touched or copied."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in memo:
            continue
        with fake_mode:
            fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
        memo[id(tensor)] = (nn.Parameter(fake, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else fake)
    return copy.deepcopy(model, memo)


def _hf_model(config: Any) -> nn.Module:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise VBConfigError(tr("估算 Hugging Face 配置需要安装 transformers",
                               "estimating a Hugging Face config needs transformers installed")) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _hf_config(path: Path) -> Any:
    if not path.exists():
        raise VBDataError(tr(f"配置文件不存在: {path}", f"config file does not exist: {path}"))
    try:
        from transformers import AutoConfig
    except ImportError:
        raise VBConfigError(tr("读取 config.json 需要安装 transformers",
                               "reading a config.json needs transformers installed")) from None
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise VBConfigError(tr(f"无法读取 Hugging Face 配置 {path}: {first_line(exc)}",
                               f"cannot read the Hugging Face config {path}: {first_line(exc)}")) from None


def _meta_model(target: Any) -> tuple[nn.Module, str]:
    """The model ``target`` names, built on the meta device (a module is returned as it is),
    and its description."""
    from apt_model.modeling.apt_model import APTConfig, APTModel

    if isinstance(target, nn.Module):
        return target, type(target).__name__
    if isinstance(target, (str, Path)) and (isinstance(target, Path) or target.endswith(".json")
                                            or Path(target).exists()):
        target = _hf_config(Path(target).expanduser())
    elif isinstance(target, str):
        target = APTConfig.from_preset(target)  # an unknown name raises VBConfigError
    with autopatch.building():  # not outermost: VB's hook leaves the model alone
        if isinstance(target, APTConfig):
            with torch.device("meta"):
                return APTModel(target), f"APT d{target.d_model}×{target.n_layers}"
        if hasattr(target, "model_type") and hasattr(target, "to_dict"):
            return _hf_model(target), f"{type(target).__name__.removesuffix('Config')} ({target.model_type})"
    raise VBConfigError(tr(f"无法估算 {type(target).__name__}: 需要 APT 预设名、APTConfig、Hugging Face 配置、"
                           "config.json 路径或 nn.Module",
                           f"cannot estimate a {type(target).__name__}: give an APT preset name, an APTConfig, a "
                           "Hugging Face config, a config.json path or an nn.Module"))


def _vocab_and_context(model: nn.Module) -> tuple[int, int | None]:
    """The token range and the longest context of ``model`` (from its config, else its
    first embedding; the context None when unknown)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if vocab is None:
        raise VBConfigError(tr(f"{type(model).__name__} 没有词表大小 (config.vocab_size 或 nn.Embedding)",
                               f"{type(model).__name__} has no vocabulary size (config.vocab_size or an nn.Embedding)"))
    return vocab, context_length(model)


def context_length(model: nn.Module) -> int | None:
    """The longest input the model accepts (APT, GPT-2, Llama config names), or None."""
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def mode_config(mode: str, base: VBConfig | None = None) -> VBConfig:
    """The configuration that optimizes for ``mode``: its switches, with the FP4 format, skip
    list, minimum size and checkpointed blocks of ``base``."""
    base = base or VBConfig()
    return VBConfig(enabled=True, mode=mode, verbose=False, fp4_format=base.fp4_format, fp4_skip=base.fp4_skip,
                    fp4_min_features=base.fp4_min_features, checkpoint_blocks=base.checkpoint_blocks)


# ---- measuring one step ------------------------------------------------------------------------


def _output_tensors(out: Any, names: tuple[str, ...]) -> list[torch.Tensor]:
    found = [out.get(n) if isinstance(out, dict) else getattr(out, n, None) for n in names]
    return [t for t in found if isinstance(t, torch.Tensor)]


def _optimizer(name: str, params: list[nn.Parameter], device_type: str) -> torch.optim.Optimizer:
    """AdamW with torch's defaults, or plain SGD (no momentum, no state). On an accelerator
    AdamW takes the multi-tensor (foreach) path, torch's default there."""
    foreach = device_type != "cpu"
    if name == "adamw":
        return torch.optim.AdamW(params, foreach=foreach)
    return torch.optim.SGD(params, lr=1e-3, foreach=foreach)


def _parameter_bytes(model: nn.Module) -> tuple[dict[str, int], set[int]]:
    """Bytes of the parameters by dtype, and of frozen FP4 layers' packed weights by format;
    plus the ids of those tensors."""
    from apt_model.fp4.layer import PACKED_BUFFERS, FP4Linear

    by_kind: dict[str, int] = {}
    ids: set[int] = set()
    tensors = [(str(p.dtype).removeprefix("torch."), p) for p in model.parameters()]
    for module in model.modules():
        if isinstance(module, FP4Linear) and module.frozen:
            tensors += [(f"{module.fmt} packed", t) for name in PACKED_BUFFERS.values()
                        if (t := getattr(module, name)) is not None]
    storages: set[int] = set()  # a fused group's members are views of one storage: counted once
    for kind, tensor in tensors:
        ids.add(id(tensor))
        storage = tensor.untyped_storage()
        if storage._cdata not in storages:
            storages.add(storage._cdata)
            by_kind[kind] = by_kind.get(kind, 0) + storage.nbytes()
    return by_kind, ids


def _counted(tracker: MemoryTracker, tensors: list[torch.Tensor]) -> dict[int, int]:
    """serial -> bytes of the storages of ``tensors`` that ``tracker`` counts now."""
    return {s: t.untyped_storage().nbytes() for t in tensors if (s := tracker.serial_of(t)) is not None}


def _serials(tracker: MemoryTracker, tensors: list[torch.Tensor]) -> set[int]:
    return set(_counted(tracker, tensors))


def _sum(snapshot: dict[int, int], serials: set[int]) -> int:
    return sum(nbytes for serial, nbytes in snapshot.items() if serial in serials)


def measure(model: nn.Module, *, batch: int, seq: int, optimizer: str | None = "adamw",
            device_type: str = "cpu", target: str = "", mode: str = OFF, offload: bool = False) -> Estimate:
    """Run one step of ``model`` (real or fake tensors, as it holds) under a
    :class:`MemoryTracker` and return what it counted. ``optimizer`` None: a decode step.
    ``offload``: the optimizer is offloaded (``vgpu.offload_optimizer``): no optimizer state on
    the device, and each gradient leaves it as soon as it is final.

    ``model`` must take ``model(input_ids=..., labels=...)`` and return the loss as
    ``.loss`` (training), and ``use_cache=True`` and its cache back (decode; by the name
    ``cache_keyword`` gives), as APT and Hugging Face causal language models do. A training
    step leaves it trained by that step, its weights decayed once more by the step that
    creates the optimizer state (gradients it held before are dropped first).
    """
    vocab, _context = _vocab_and_context(model)
    device = next(model.parameters()).device
    params, param_ids = _parameter_bytes(model)
    tracker = MemoryTracker(cuda_block_bytes if device_type == "cuda" else None)
    tracker.add([*model.parameters(), *model.buffers()])
    with tracker, _block_sites(model, tracker), bf16_assumed(_native_bf16(device_type)):
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        if optimizer is not None:
            model.zero_grad(set_to_none=True)
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = None if offload else _optimizer(optimizer, trainable, device_type)
            if opt is not None:
                _create_optimizer_state(opt)
            tracker.reset_peak()
            with _gradients_leave(trainable if offload else [], tracker) as left:
                outputs, grads = _training_step(model, opt, ids, tracker)
            state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)] if opt else []
            cache: set[int] = set()
        else:
            model.eval()
            tracker.reset_peak()
            outputs, kv, cache = _decode_step(model, ids, tracker)  # kv: held until counted
            grads, state, left = [], [], set()
        tracker.finish()
        kinds = {
            "parameters": _serials(tracker, [t for t in (*model.parameters(), *model.buffers()) if id(t) in param_ids]),
            "gradients": _serials(tracker, grads) | left,
            "optimizer_state": _serials(tracker, state),
            "kv_cache": cache,
            "logits_loss": set(outputs),
        }
    baseline = tracker.phase_peak("start")[1]
    kinds["buffers"] = set(baseline) - kinds["parameters"] - kinds["optimizer_state"]
    known = set().union(*kinds.values())
    at_peak = {key: _sum(tracker.snapshot_at_peak, kinds[key]) for key in kinds}
    at_peak["activations"] = sum(n for s, n in tracker.snapshot_at_peak.items() if s not in known)
    by_site: dict[str, int] = {}
    for serial, nbytes in sorted(tracker.snapshot_at_peak.items()):
        if serial not in known:
            site = tracker.site_of(serial)
            by_site[site] = by_site.get(site, 0) + nbytes
    busy = [tracker.phase_peak(p)[1] for p in ("forward", "backward", "prefill", "decode")]
    live = tracker.live_serials()
    return Estimate(
        target=target or type(model).__name__, mode=mode, device=device_type, batch=batch, seq=seq,
        optimizer=optimizer, parameters=params, buffers=_sum(baseline, kinds["buffers"]),
        gradients=_sum(live, kinds["gradients"]), optimizer_state=_sum(live, kinds["optimizer_state"]),
        activations=max(sum(n for s, n in snap.items() if s not in known) for snap in busy),
        logits_loss=sum(outputs.values()), traced_peak=tracker.peak, kv_cache=_sum(live, cache),
        at_peak={key: at_peak[key] for key in COMPONENTS}, activations_at_peak=_in_block_order(by_site),
        runtime_overhead=CUDA_RUNTIME_OVERHEAD if device_type == "cuda" else 0,
    )


def _native_bf16(device_type: str) -> bool:
    """Whether a step on ``device_type`` runs VB's bf16 autocast: this machine's answer for
    the CPU or a present accelerator; yes for an absent one (the cards VB targets have bf16)."""
    if device_type != "cpu":
        backend = getattr(torch, device_type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            return True  # the target is not on this machine
    return supports_bf16(torch.device(device_type))


@contextlib.contextmanager
def _block_sites(model: nn.Module, tracker: MemoryTracker) -> Any:
    """While open, what the model's repeated blocks allocate (forward and recomputation) is
    labelled ``"block i"`` on ``tracker``: hooks on each block and on its direct children
    (checkpointing recomputes a block by calling its ``forward``, which skips the block's own
    hooks but not its children's), removed after."""
    from apt_model.optimization.checkpointing import find_blocks

    def enter(label: str, *_: Any) -> None:
        tracker.sites.append(label)

    def leave(*_: Any) -> None:
        tracker.sites.pop()

    handles = []
    for i, block in enumerate(find_blocks(model)):
        for module in (block, *block.children()):
            handles.append(module.register_forward_pre_hook(functools.partial(enter, f"block {i}")))
            handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        tracker.sites.clear()


def _in_block_order(sites: dict[str, int]) -> dict[str, int]:
    """``sites`` with the blocks first, by index, then the phases as they came."""
    blocks = sorted((label for label in sites if label.startswith("block ")), key=lambda label: int(label[6:]))
    return {**{label: sites[label] for label in blocks},
            **{label: n for label, n in sites.items() if not label.startswith("block ")}}


def _create_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Give ``opt`` the state its first step creates (AdamW's moments and step count), by one
    step on zero gradients rather than a forward and backward pass: the state's shapes do not
    depend on the data. The gradients are dropped after (an AdamW step still decays the
    weights)."""
    for group in opt.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    opt.step()
    opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _gradients_leave(params: list[nn.Parameter], tracker: MemoryTracker) -> Any:
    """While open, each of ``params``' gradients is dropped as soon as it is final, as the
    offloaded optimizer's hook drops it once copied off the device; yields the serials of the
    gradients dropped (so far: read it after)."""
    left: set[int] = set()

    def drop(param: torch.Tensor) -> None:
        serial = tracker.serial_of(param.grad)
        if serial is not None:
            left.add(serial)
        param.grad = None

    hooks = [p.register_post_accumulate_grad_hook(drop) for p in params]
    try:
        yield left
    finally:
        for hook in hooks:
            hook.remove()


def _training_step(model: nn.Module, opt: torch.optim.Optimizer | None, ids: torch.Tensor,
                   tracker: MemoryTracker) -> tuple[dict[int, int], list[torch.Tensor]]:
    """One step as a training loop writes it, ``model(input_ids=ids, labels=ids).loss.backward()``
    then ``opt.step()`` (None: stepped off the device): the model's outputs other than the
    loss (the logits) are dropped before the backward pass, which then never holds them
    unless autograd saved them.
    The step marks its phases on ``tracker`` and returns serial -> bytes of the loss and
    logits at the end of the forward pass, and the gradients."""
    tracker.phase("start")
    tracker.phase("forward")
    out = model(input_ids=ids, labels=ids)
    loss = _output_tensors(out, ("loss",))
    if not loss:
        raise VBConfigError(tr(f"{type(model).__name__} 的输出没有 loss (需要 model(input_ids=..., labels=...))",
                               f"{type(model).__name__} returned no loss (it must take "
                               "model(input_ids=..., labels=...))"))
    outputs = _counted(tracker, _output_tensors(out, ("loss", "logits")))
    del out
    tracker.phase("backward")
    loss[0].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    tracker.phase("optimizer")
    if opt is not None:
        opt.step()
    return outputs, grads


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The tensors a KV cache object holds: APT's ``KVCache``, Hugging Face's ``Cache``
    classes or legacy tuples, found through attributes, lists, tuples and dicts."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    pending = [cache]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif hasattr(item, "__dict__") and not isinstance(item, (nn.Module, type)):
            pending.extend(vars(item).values())
    return found


def cache_keyword(model: nn.Module) -> str:
    """The name ``model`` takes and returns its KV cache by: "cache" where its own ``forward``
    (under VB's wrappers) has that parameter (Hugging Face transformers 5), else
    "past_key_values" (APT, earlier HF)."""
    from apt_model.optimization.wrapping import original_class

    forward = inspect.signature(original_class(model).forward)
    return "cache" if "cache" in forward.parameters else "past_key_values"


def _decode_step(model: nn.Module, ids: torch.Tensor,
                 tracker: MemoryTracker) -> tuple[dict[int, int], list[torch.Tensor], set[int]]:
    """Prefill ``seq - 1`` tokens with the KV cache, then decode one; returns serial -> bytes
    of the logits kept, the cache's tensors at the end and the serials of every storage the
    cache held (after the prefill and at the end)."""
    keyword = cache_keyword(model)
    tracker.phase("start")
    with torch.no_grad():
        tracker.phase("prefill")
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        serials = _serials(tracker, cache_tensors(getattr(prefill, keyword)))
        tracker.phase("decode")
        out = model(input_ids=ids[:, -1:], use_cache=True, **{keyword: getattr(prefill, keyword)})
        cache = cache_tensors(getattr(out, keyword))
    logits = _counted(tracker, _output_tensors(prefill, ("logits",)) + _output_tensors(out, ("logits",)))
    return logits, cache, serials | _serials(tracker, cache)


# ---- the public verb ---------------------------------------------------------------------------


class Traced:
    """A target built on fake tensors with VB's passes for one mode, ready to trace steps of
    any size (``step``): the model is built and optimized once, and each step then costs one
    trace. ``context`` is the model's longest context (None when unknown). With ``levels``
    (VGPU levels, as ``estimate`` takes them) the model is also laid out and planned over
    them once (``vb_plan``; ``levels.PlacementError`` when they cannot hold it)."""

    def __init__(self, target: Any, *, mode: str | None, training: bool, device: str | None,
                 base: VBConfig | None, levels: Any = None) -> None:
        from apt_model.estimator.levels import parse_levels
        from apt_model.fp4.layer import freeze_fp4
        from apt_model.optimization import engine

        if mode is not None:
            _check_choice(tr("模式", "mode"), mode, ESTIMATE_MODES)
        vgpu_config = parse_levels(levels) if levels is not None else None
        level0 = vgpu_config.levels[0].device if vgpu_config is not None else None
        self.device_type = _device_type(device or level0 or (base.device if base else "auto"))
        if level0 is not None and _device_type(level0) != self.device_type:
            raise VBConfigError(tr(f"VGPU Level 0 ({level0}) 与估算的设备 ({self.device_type}) 不符",
                                   f"VGPU Level 0 ({level0}) is not the estimate's device ({self.device_type})"))
        source, self.description = _meta_model(target)
        origin = next((t.device for t in (*source.parameters(), *source.buffers())), torch.device("meta"))
        report = engine.report_of(source)
        if report is not None and mode not in (None, report.mode):
            raise VBConfigError(tr(f"此模型已按模式 '{report.mode}' 优化, 不能按模式 '{mode}' 估算",
                                   f"this model is already optimized in mode '{report.mode}' and cannot be "
                                   f"estimated in mode '{mode}'"))
        self.mode = report.mode if report is not None else (mode or "balanced")
        self.training = training
        _vocab, self.context = _vocab_and_context(source)
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.model = fake_copy(source, self.fake_mode)
        with self.fake_mode:
            if report is None and self.mode != OFF:
                engine.optimize(self.model, mode_config(self.mode, base))
            if not training:
                freeze_fp4(self.model)  # serving holds packed FP4 weights only (a no-op without FP4 layers)
        # a model described by a config is built on the host, as VB builds it
        self._moved = ("cpu" if origin.type == "meta" else origin.type) != self.device_type
        self._checkpoint_blocks = (base or VBConfig()).checkpoint_blocks
        explicit = base.offload_optimizer if base is not None else None
        spec = MODES.get(self.mode)
        self._switch_offloads = self.device_type != "cpu" and bool(
            explicit if explicit is not None else spec is not None and spec.offload_optimizer)
        self.vb_plan: ModelPlan | None = None
        if vgpu_config is not None:
            self.vb_plan = self._plan(vgpu_config)

    def _plan(self, config: VGPUConfig) -> ModelPlan:
        from apt_model.estimator.levels import ModelPlan

        return ModelPlan(self.model, config, moved=self._moved, checkpoint_blocks=self._checkpoint_blocks)

    def placed(self, est: Estimate, levels: Any) -> Estimate:
        """``est`` (a step traced by this object) placed over ``levels`` instead: one new plan,
        and a new trace unless neither ``est``'s plan nor the new one streams a block (a
        streamed block releases its weight casts: the step's own tensors change)."""
        from apt_model.estimator.levels import parse_levels

        plan = self._plan(parse_levels(levels))
        if plan.plan.streamed or (est.placement is not None and est.placement.streamed):
            return self._step(plan, batch=est.batch, seq=est.seq, optimizer=est.optimizer or "adamw")
        offload = _offloads(est.optimizer, plan, self._switch_offloads)
        return dataclasses.replace(est, placement=plan.placement(est.traced_peak, device_type=self.device_type,
                                                                 offload=offload))

    def step(self, *, batch: int, seq: int | None = None, optimizer: str = "adamw") -> Estimate:
        """One step of ``batch`` × ``seq`` tokens (default: the context length), traced (over
        ``vb_plan`` when levels were given). ``levels.PlacementError`` when the plan streams
        blocks in a training step that the stack cannot train (``ModelPlan.check_training``)."""
        return self._step(self.vb_plan, batch=batch, seq=seq, optimizer=optimizer)

    def _step(self, plan: ModelPlan | None, *, batch: int, seq: int | None, optimizer: str) -> Estimate:
        _check_step(batch, seq, optimizer)
        seq = seq or self.context
        if seq is None:
            raise VBConfigError(tr("无法得知模型的上下文长度, 请给出 seq", "the model's context length is unknown: give seq"))
        if self.context is not None and seq > self.context:
            raise VBConfigError(tr(f"seq={seq} 超过模型的上下文长度 {self.context}",
                                   f"seq={seq} exceeds the model's context length {self.context}"))
        if not self.training and seq < 2:
            raise VBConfigError(tr("解码估算需要 seq >= 2 (预填充 seq-1 个 token, 再解码 1 个)",
                                   "a decode estimate needs seq >= 2 (a prefill of seq-1 tokens, then one)"))
        offload = self.training and _offloads(optimizer, plan, self._switch_offloads)
        if plan is not None and self.training:
            plan.check_training(offload=offload)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.fake_mode)
            if self.device_type == "cuda":  # the kernels and autocast lists a CUDA card would use
                stack.enter_context(cuda_attention())
                stack.enter_context(cuda_autocast())
            if plan is not None:
                stack.enter_context(plan.releasing_casts())
            est = measure(self.model, batch=batch, seq=seq, optimizer=optimizer if self.training else None,
                          device_type=self.device_type, target=self.description, mode=self.mode, offload=offload)
        if plan is None:
            return est
        placement = plan.placement(est.traced_peak, device_type=self.device_type, offload=offload)
        return dataclasses.replace(est, placement=placement)


def _offloads(optimizer: str | None, plan: ModelPlan | None, switch: bool = False) -> bool:
    """Whether a training step with ``optimizer`` offloads it, as VB's trainer does
    (``vb.offloads_training``): AdamW, with levels below Level 0 or the ``offload_optimizer``
    switch on for an accelerator (``switch``)."""
    return optimizer == "adamw" and ((plan is not None and plan.config.offloads) or switch)


def estimate(target: Any, *, mode: str | None = None, batch: int = 1, seq: int | None = None,
             optimizer: str = "adamw", training: bool = True, device: str | None = None,
             base: VBConfig | None = None, levels: Any = None) -> Estimate:
    """Peak memory of one step of ``target`` in ``mode``, traced on fake tensors (seconds,
    no accelerator, the target's own tensors untouched).

    ``target``: an APT preset name or ``APTConfig``, a Hugging Face config or the path of a
    ``config.json`` (needs transformers), or an ``nn.Module`` (one VB already optimized is
    traced as it is, and ``mode`` must then be its mode or None). ``mode``: one of
    ``ESTIMATE_MODES`` ("off": no VB pass; None: "balanced", or a module's own mode).
    ``seq`` defaults to the model's context length; ``training=False`` traces a decode
    step (FP4 layers frozen, as for serving). ``device`` ("cpu", "cuda", ...; default the
    configured one; it need not exist here) decides the runtime overhead and the
    optimizer's multi-tensor path and, for "cuda", the attention kernel (the one CUDA's
    dispatcher picks, ``attention.cuda_kernel``) and autocast's fp32 ops (``cuda_autocast``);
    the rest of the step is traced with CPU semantics.
    ``base`` supplies the FP4 format, skip list and checkpointed blocks. ``levels``: VGPU
    levels (``vgpu_config`` or its list of levels; Level 0 is the device, which need not exist
    here): the estimate's ``placement`` says what the stack puts on each level and the
    device's peak with it (a training step with AdamW offloads the optimizer, as VB's trainer
    does). Bad input, or levels that cannot hold the model, raise ``VBConfigError`` (or
    ``VBDataError`` for a missing config file).
    """
    _check_step(batch, seq, optimizer)  # before the model is built: bad input fails at once
    traced = Traced(target, mode=mode, training=training, device=device, base=base, levels=levels)
    return traced.step(batch=batch, seq=seq, optimizer=optimizer)


def decode_contexts(longest: int) -> list[int]:
    """The context lengths of a decode sweep up to ``longest``: ``FIRST_DECODE_CONTEXT``,
    doubling while shorter than ``longest``, then ``longest`` itself."""
    positive_int("seq", longest)
    contexts = []
    context = FIRST_DECODE_CONTEXT
    while context < longest:
        contexts.append(context)
        context *= 2
    return [*contexts, longest]


def decode_sweep(target: Any, *, mode: str | None = None, batch: int = 1, longest: int | None = None,
                 device: str | None = None, base: VBConfig | None = None, levels: Any = None) -> list[Estimate]:
    """One traced decode step per context length of ``decode_contexts(longest)`` (default:
    the model's context length), the model built and optimized once: weights, KV cache and
    peak by context. Arguments and errors as for ``estimate``."""
    positive_int("batch", batch)
    traced = Traced(target, mode=mode, training=False, device=device, base=base, levels=levels)
    longest = longest or traced.context
    if longest is None:
        raise VBConfigError(tr("无法得知模型的上下文长度, 请给出 seq", "the model's context length is unknown: give seq"))
    # the longest first: a context the model does not take fails before any other is traced
    rows = [traced.step(batch=batch, seq=context) for context in reversed(decode_contexts(longest))]
    return rows[::-1]


def decode_table(rows: list[Estimate]) -> str:
    """A decode sweep (``decode_sweep``) as a text table: one line per context length (the
    peak: the device's), then the VGPU placement if any."""
    first = rows[0]
    lines = [tr(f"{first.target} · 模式 {first.mode} · 解码 · batch {first.batch} · {first.device}",
                f"{first.target} · mode {first.mode} · decode · batch {first.batch} · {first.device}"),
             f"  {tr('上下文', 'context'):>10}{tr('权重', 'weights'):>12}{tr('KV 缓存', 'KV cache'):>12}"
             f"{tr('激活', 'activations'):>14}{tr('峰值', 'peak'):>12}"]
    for row in rows:
        lines.append(f"  {row.seq:>10}{human_bytes(row.parameter_bytes):>12}{human_bytes(row.kv_cache):>12}"
                     f"{human_bytes(row.activations):>14}{human_bytes(row.peak_bytes):>12}")
    if rows[-1].placement is not None:  # the same placement at every context; the longest's device peak
        lines += rows[-1].placement.lines()
    return "\n".join(lines)
