"""The in-process ("playground") trainer.

AdamW + warmup/cosine, the user's plain loop (``loss = model(x, labels=x).loss;
loss.backward(); optimizer.step(); zero_grad``), a tqdm bar, held-out validation, a generated
sample, a JSON-lines log, atomic checkpoints and bit-exact resume. Virtual Blackwell needs no
change to that loop: models built while it is on come out optimized (autopatch), so the model
is built only after the run's VB configuration is resolved and switched on.

Progress is not lost: SIGINT (Ctrl-C) and SIGTERM finish the step in flight, save a
checkpoint and exit (130 / 143); ``--resume`` continues from the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from apt_model import accelerator
from apt_model.errors import VBConfigError, VBDataError, VBInterrupted
from apt_model.estimator import context_length
from apt_model.figures import missing_matplotlib_message
from apt_model.i18n import tr
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.optimization import vb_global
from apt_model.storage import human_bytes
from apt_model.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from apt_model.training.data import VOCAB_SIZE, ByteCorpus, decode
from apt_model.training.run_log import (
    LOG_NAME,
    PLOT_NAME,
    RunLog,
    plot_log,
)
from apt_model.vgpu.offload import OffloadedAdamW

SAMPLE_PROMPT_BYTES = 32
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 40


@dataclass
class TrainConfig:
    """Everything one training run needs; saved in each checkpoint."""

    preset: str = "tiny"
    epochs: int | None = None  # with neither epochs nor max_steps: one epoch
    max_steps: int | None = None  # caps the run (and the LR schedule) when given
    batch_size: int = 16
    seq_len: int = 128  # predicted tokens per window; the model sees seq_len + 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    warmup: int = 20  # linear warm-up steps
    grad_clip: float = 1.0  # 0 disables clipping
    data: list[str] = field(default_factory=list)  # empty: the embedded pydoc corpus
    device: str | None = None  # None: VB's ``device`` option (VB_DEVICE, .vbrc, else auto)
    out_dir: str = "runs/playground-tiny"
    resume: bool = False  # continue from the newest intact checkpoint under out_dir
    resume_from: str | None = None  # continue from this checkpoint folder
    overwrite: bool = False  # a fresh run may set aside out_dir's earlier checkpoints
    seed: int = 1337
    eval_interval: int = 100  # 0: validate only at the end
    eval_batches: int = 8
    log_interval: int = 10
    save_interval: int = 100  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    sample_tokens: int = 200
    enable_vb: bool | None = None  # the launcher's --enable-vb (None: not given)
    vb_mode: str | None = None  # the launcher's --vb-mode (None: not given)
    progress: bool = True  # the tqdm bar

    def validate(self) -> None:
        """Reject impossible values up front, with the option's name, as one clear error."""
        positive = {"batch_size": self.batch_size, "seq_len": self.seq_len, "eval_batches": self.eval_batches,
                    "log_interval": self.log_interval, "keep_checkpoints": self.keep_checkpoints}
        positive.update({k: v for k, v in (("epochs", self.epochs), ("max_steps", self.max_steps)) if v is not None})
        non_negative = {"warmup": self.warmup, "eval_interval": self.eval_interval,
                        "save_interval": self.save_interval, "sample_tokens": self.sample_tokens}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise VBConfigError(tr(f"{name} 必须是正整数, 得到 {value!r}", f"{name} must be a positive integer, got {value!r}"))
        for name, value in non_negative.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise VBConfigError(tr(f"{name} 必须是非负整数, 得到 {value!r}", f"{name} must be a non-negative integer, got {value!r}"))
        for name, value in (("lr", self.lr), ("weight_decay", self.weight_decay), ("grad_clip", self.grad_clip),
                            ("min_lr_ratio", self.min_lr_ratio)):
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise VBConfigError(tr(f"{name} 取值无效: {value!r}", f"invalid {name}: {value!r}"))

    def vb_cli_options(self) -> dict[str, Any]:
        """The VB options this run gives at the CLI level (the flags that were given)."""
        options = {"enabled": self.enable_vb, "mode": self.vb_mode, "device": self.device}
        return {key: value for key, value in options.items() if value is not None}

    def total_steps(self, steps_per_epoch: int) -> int:
        by_epochs = (self.epochs or 1) * steps_per_epoch
        if self.max_steps is None:
            return by_epochs
        return self.max_steps if self.epochs is None else min(self.max_steps, by_epochs)


@dataclass
class TrainResult:
    """What a run achieved; ``losses`` holds every step's loss since step 0 (resumes included)."""

    steps: int
    epochs: float
    final_loss: float  # mean train loss over the last log_interval steps
    val_loss: float
    losses: list[float]
    tokens_per_sec: float  # training throughput of this invocation
    elapsed_s: float
    sample: str  # prompt + generated continuation
    checkpoint: str
    device: str
    num_parameters: int
    peak_memory_bytes: int
    vb_enabled: bool
    vb_stats: dict[str, Any] | None
    log: str  # the JSON-lines log of every step and validation
    plot: str | None  # the loss curve (PNG), None without matplotlib


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine down to ``cfg.lr * cfg.min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, total - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _process_rss() -> int | None:
    """Resident memory of this process (Linux /proc), the CPU's stand-in for device memory."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_bytes(device: torch.device) -> int | None:
    """Device memory held by tensors now; on the CPU the process's resident memory."""
    return accelerator.memory_allocated(device) if device.type != "cpu" else _process_rss()


def memory_text(device: torch.device) -> str:
    used = memory_bytes(device)
    if used is None:
        return "-"
    return human_bytes(used) if device.type != "cpu" else "rss " + human_bytes(used)


def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create the output folder and prove it is writable now, not after an hour of training."""
    out = Path(path).expanduser()
    probe = out / f".write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise VBDataError(tr(f"输出目录不可写: {out} ({exc.strerror})",
                             f"output folder is not writable: {out} ({exc.strerror})")) from None
    return out


def start_fresh(ckpt_root: Path, overwrite: bool) -> None:
    """A fresh run never takes over an earlier run's checkpoints silently.

    If ``ckpt_root`` holds checkpoints: without ``overwrite`` that is an error saying how to
    go on (``--resume``, ``--overwrite`` or another ``--out``); with it they move to
    ``checkpoints.prev``, replacing the ones an earlier ``--overwrite`` set aside there (the
    run log moves to ``train_log.prev.jsonl`` when the new run opens it, see ``RunLog``).
    """
    latest = latest_checkpoint(ckpt_root)
    if latest is None:
        return
    previous = ckpt_root.with_name(ckpt_root.name + ".prev")
    if not overwrite:
        raise VBConfigError(tr(
            f"{ckpt_root} 中已有一次训练的检查点 (最新: {latest.name}): 用 --resume 继续, 用 --overwrite "
            f"重新开始 (旧检查点移到 {previous}), 或用 --out 换一个目录",
            f"{ckpt_root} already holds a run's checkpoints (latest: {latest.name}): continue it with "
            f"--resume, start over with --overwrite (they move to {previous}), or pick another --out"))
    shutil.rmtree(previous, ignore_errors=True)
    try:
        os.replace(ckpt_root, previous)
    except OSError as exc:
        raise VBDataError(tr(f"无法移走旧检查点 {ckpt_root}: {exc.strerror}",
                             f"cannot move old checkpoints {ckpt_root} aside: {exc.strerror}")) from None
    print(tr(f"--overwrite: 旧检查点 (最新 {latest.name}) 已移到 {previous}",
             f"--overwrite: the earlier checkpoints (latest {latest.name}) moved to {previous}"))


def load_resume_state(ckpt_root: Path, resume_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """The checkpoint a resumed run continues from: ``resume_from`` (one checkpoint folder,
    verified), else the newest intact one under ``ckpt_root``; says which, and which newer
    ones were passed over and why."""
    state = load_checkpoint(resume_from if resume_from is not None else ckpt_root)
    for folder, reason in state.get("skipped", ()):
        print(tr(f"跳过损坏的检查点 {folder}: {reason}", f"skipping damaged checkpoint {folder}: {reason}"))
    print(tr(f"从 {state['path']} (第 {state['step']} 步) 继续", f"resuming from {state['path']} (step {state['step']})"))
    return state


def _vb_text(vb: dict[str, Any] | None) -> str:
    return tr(f"模式 {vb['mode']}", f"mode {vb['mode']}") if vb else tr("关闭", "off")


def check_same_vb(state: dict[str, Any]) -> None:
    """A resumed run trains with the VB the checkpoint was trained with (on/off and mode)."""
    saved = state.get("vb_config")
    now = vb_global.get_config() if vb_global.is_enabled() else None
    if (saved and saved["mode"]) != (now and now["mode"]):
        raise VBConfigError(tr(
            f"检查点 {state['path']} 训练时虚拟Blackwell为{_vb_text(saved)}, 现在为{_vb_text(now)}; "
            "请用相同的 --enable-vb/--vb-mode, VB_MODE 或 .vbrc 继续",
            f"checkpoint {state['path']} was trained with Virtual Blackwell {_vb_text(saved)}, now it is "
            f"{_vb_text(now)}; resume with the same --enable-vb/--vb-mode, VB_MODE or .vbrc"))


@dataclass
class _StopRequest:
    """The termination signal received during training, if any."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals() -> Any:
    """Turn SIGINT/SIGTERM into a request the loop honours after the step in flight (a
    second signal stops at once). Only the main thread can take signals; elsewhere the
    request never comes."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, _frame: Any) -> None:
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _mismatch_detail(model: nn.Module, saved: dict[str, torch.Tensor]) -> str:
    """Which tensors differ between ``model`` and a saved state_dict, in one short line."""
    own = model.state_dict()

    def listed(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")

    parts = []
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k} {list(saved[k].shape)}≠{list(own[k].shape)}" for k in own
              if k in saved and saved[k].shape != own[k].shape]
    for label, names in ((tr("缺少", "missing"), missing), (tr("多余", "unexpected"), unexpected),
                         (tr("形状不同", "shape differs"), shapes)):
        if names:
            parts.append(f"{label}: {listed(names)}")
    return "; ".join(parts)


def _json_safe(value: Any) -> Any:
    """Plain lists/dicts/str/numbers, so ``torch.load(weights_only=True)`` can read it back."""
    return json.loads(json.dumps(value, default=str))


def _device_rng_states(device: torch.device) -> list[torch.Tensor] | None:
    module = getattr(torch, device.type, None)
    getter = getattr(module, "get_rng_state_all", None)
    return getter() if device.type != "cpu" and callable(getter) else None


def _set_device_rng_states(device: torch.device, states: list[torch.Tensor] | None) -> None:
    setter = getattr(getattr(torch, device.type, None), "set_rng_state_all", None)
    if states is not None and device.type != "cpu" and callable(setter):
        setter(states)


class Trainer:
    """Train a causal LM on byte-level text; ``model_factory`` builds it (default: APT preset).

    The factory is called after VB is switched on and after seeding, so a rebuilt model (on
    resume) starts from the same place and VB's autopatch applies to it.
    """

    def __init__(self, cfg: TrainConfig, model_factory: Callable[[], nn.Module] | None = None,
                 resume_state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.model_factory = model_factory or self._apt_factory
        self.resume_state = resume_state  # already loaded by the launcher (``load_resume_state``)

    def _apt_factory(self) -> nn.Module:
        return APTModel(APTConfig.from_preset(self.cfg.preset))

    def build_model(self) -> nn.Module:
        """The model to train, checked against byte tokens and the window length."""
        model = self.model_factory()
        vocab = getattr(getattr(model, "config", None), "vocab_size", VOCAB_SIZE)
        if vocab < VOCAB_SIZE:
            raise VBConfigError(tr(f"模型词表 {vocab} 小于字节词表 {VOCAB_SIZE}",
                                   f"model vocabulary {vocab} is smaller than the byte vocabulary {VOCAB_SIZE}"))
        limit = context_length(model)
        if limit is not None and self.cfg.seq_len + 1 > limit:
            raise VBConfigError(tr(f"--seq-len {self.cfg.seq_len} 太长: 模型最多接受 {limit} 个 token (seq_len + 1)",
                                   f"--seq-len {self.cfg.seq_len} is too long: the model accepts at most {limit} "
                                   "tokens (seq_len + 1)"))
        return model

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW; no weight decay on gains and norms (1-D parameters), as usual for transformers.
        With VGPU levels below Level 0 its masters and state are offloaded to host RAM (and it
        clips the gradients itself: ``--grad-clip``)."""
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.95))
        if vb_global.offloads_training(vb_global.active_config()):
            return vb_global.offload_optimizer(model, optimizer, max_grad_norm=self.cfg.grad_clip or None)
        return optimizer

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                 generator: torch.Generator) -> torch.Tensor:
        """Prompt + continuation, through the APT model's cached ``generate``."""
        return model.generate(prompt, max_new_tokens=max_new_tokens, temperature=SAMPLE_TEMPERATURE,
                              top_k=SAMPLE_TOP_K, generator=generator)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, corpus: ByteCorpus, device: torch.device) -> float:
        """Mean loss on fixed held-out windows (own generator: same windows every time, and
        the training RNG streams are left alone so resume stays exact)."""
        cfg = self.cfg
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        model.eval()
        total = 0.0
        for _ in range(cfg.eval_batches):
            x = corpus.get_batch("val", cfg.batch_size, cfg.seq_len, generator).to(device)
            total += float(model(x, labels=x).loss)
        model.train()
        return total / cfg.eval_batches

    def sample(self, model: nn.Module, corpus: ByteCorpus, device: torch.device) -> str:
        """Text the model writes after the first bytes of the validation split."""
        prompt = corpus.val[:SAMPLE_PROMPT_BYTES].long()[None].to(device)
        limit = context_length(model)
        room = self.cfg.sample_tokens if limit is None else min(self.cfg.sample_tokens, limit - prompt.shape[1])
        if room <= 0:
            return decode(prompt[0])
        generator = torch.Generator(device=device).manual_seed(self.cfg.seed)
        return decode(self.generate(model, prompt, room, generator)[0].cpu())

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: float,
               losses: list[float], generator: torch.Generator, device: torch.device,
               corpus: ByteCorpus) -> dict[str, Any]:
        model_config = getattr(model, "config", None)
        return {
            "model": model.state_dict(),
            "step": step,
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "device": _device_rng_states(device),
                    "data": generator.get_state()},
            "losses": list(losses),
            "train_config": _json_safe(asdict(self.cfg)),
            "model_config": _json_safe(asdict(model_config)) if hasattr(model_config, "__dataclass_fields__") else None,
            "model_class": type(model).__name__,
            "vb_config": _json_safe(vb_global.get_config()) if vb_global.is_enabled() else None,
            "data_fingerprint": corpus.fingerprint(),
        }

    def _restore(self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, device: torch.device) -> None:
        saved_preset = state["train_config"].get("preset")
        detail = _mismatch_detail(model, state["model"])
        if saved_preset != self.cfg.preset or state.get("model_class") != type(model).__name__ or detail:
            raise VBConfigError(tr(
                f"检查点 {state['path']} 保存的是 {state.get('model_class')} (预设 {saved_preset}), 本次训练构建 "
                f"{type(model).__name__} (预设 {self.cfg.preset})" + (f": {detail}" if detail else ""),
                f"checkpoint {state['path']} holds {state.get('model_class')} (preset {saved_preset}); this run "
                f"builds {type(model).__name__} (preset {self.cfg.preset})" + (f": {detail}" if detail else "")))
        model.load_state_dict(state["model"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise VBConfigError(tr(f"检查点 {state['path']} 的优化器状态与本模型不符: {exc}",
                                   f"the optimizer state in checkpoint {state['path']} does not fit this model: "
                                   f"{exc}")) from None
        torch.set_rng_state(state["rng"]["torch"])
        _set_device_rng_states(device, state["rng"]["device"])
        generator.set_state(state["rng"]["data"])

    def run(self) -> TrainResult:
        cfg = self.cfg
        cfg.validate()
        vb_settings = vb_global.configure(cfg.vb_cli_options())  # bad settings stop here
        device = accelerator.resolve_device(vb_settings.config.device)
        out = prepare_out_dir(cfg.out_dir)
        ckpt_root = out / "checkpoints"
        corpus = ByteCorpus.load(cfg.data)
        corpus.check_fits(cfg.seq_len)

        resumed = self.resume_state
        if resumed is None and (cfg.resume or cfg.resume_from):
            resumed = load_resume_state(ckpt_root, cfg.resume_from)
        if resumed is None:
            start_fresh(ckpt_root, cfg.overwrite)
        else:
            check_same_vb(resumed)

        torch.manual_seed(cfg.seed)
        model = self.build_model().to(device)
        model.train()
        optimizer = self.make_optimizer(model)
        generator = torch.Generator().manual_seed(cfg.seed)
        losses: list[float] = []
        start = 0
        if resumed is not None:
            self._restore(resumed, model, optimizer, generator, device)
            losses = [float(v) for v in resumed["losses"]]
            start = int(resumed["step"])
            if resumed.get("data_fingerprint") != corpus.fingerprint():
                print(tr("注意: 数据与检查点的不同, 续训不会与原运行完全一致",
                         "note: the data differs from the checkpoint's; the resumed run will not match the original"))

        steps_per_epoch = corpus.steps_per_epoch(cfg.batch_size, cfg.seq_len)
        total = cfg.total_steps(steps_per_epoch)
        n_params = sum(p.numel() for p in model.parameters())
        vb_on = vb_global.is_enabled()
        self._announce(model, n_params, device, corpus, start, total, steps_per_epoch)

        def save(step: int) -> Path:
            state = self._state(model, optimizer, step, step / steps_per_epoch, losses, generator, device, corpus)
            return save_checkpoint(ckpt_root, state, keep=cfg.keep_checkpoints)

        accelerator.reset_peak_memory(device)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        train_time = 0.0
        started = time.perf_counter()
        bar = tqdm(total=total, initial=start, disable=not cfg.progress, dynamic_ncols=True,
                   desc=tr("训练", "train"), unit=tr("步", "step"))
        with stop_on_signals() as stop, contextlib.closing(bar), RunLog(out / LOG_NAME, start) as log:
            for step in range(start, total):
                tick = time.perf_counter()
                lr = lr_at(step, total, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = corpus.get_batch("train", cfg.batch_size, cfg.seq_len, generator).to(device)
                loss = model(x, labels=x).loss
                loss.backward()
                if cfg.grad_clip and not isinstance(optimizer, OffloadedAdamW):  # that one clips in step()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                train_time += time.perf_counter() - tick
                done = step + 1
                if not math.isfinite(losses[-1]):
                    raise VBConfigError(tr(f"训练在第 {done} 步发散 (loss={losses[-1]}); 请降低 --lr",
                                           f"training diverged at step {done} (loss={losses[-1]}); lower --lr"))
                tokens_per_s = (done - start) * tokens_per_step / max(train_time, 1e-9)
                log.write({"step": done, "loss": losses[-1], "lr": lr, "tokens_per_s": tokens_per_s,
                           "memory_bytes": memory_bytes(device), "epoch": done / steps_per_epoch,
                           "time_s": time.perf_counter() - started})
                bar.update(1)
                if done % cfg.log_interval == 0 or done == total:
                    recent = losses[-cfg.log_interval:]
                    bar.set_postfix_str(
                        f"epoch {done / steps_per_epoch:.2f} loss {sum(recent) / len(recent):.3f} "
                        f"{tokens_per_s:,.0f} tok/s mem {memory_text(device)}")
                if cfg.eval_interval and done % cfg.eval_interval == 0 and done < total:
                    val = self.evaluate(model, corpus, device)
                    log.write({"step": done, "val_loss": val})
                    bar.write(tr(f"第 {done} 步: 验证损失 {val:.4f}", f"step {done}: val loss {val:.4f}"))
                if stop.signum is not None and done < total:
                    path = save(done)
                    raise VBInterrupted(stop.signum, tr(
                        f"收到 {signal.Signals(stop.signum).name}: 第 {done} 步的检查点已保存到 {path}; 用 --resume 继续",
                        f"{signal.Signals(stop.signum).name} received: the checkpoint of step {done} is saved in "
                        f"{path}; continue with --resume"))
                if cfg.save_interval and done % cfg.save_interval == 0 and done < total:
                    save(done)
            val_loss = self.evaluate(model, corpus, device)
            log.write({"step": len(losses), "val_loss": val_loss})
            checkpoint = save(len(losses))
        plot = plot_log(log.path, out / PLOT_NAME)
        sample = self.sample(model, corpus, device)
        steps_run = max(0, total - start)
        recent = losses[-cfg.log_interval:] or [float("nan")]
        result = TrainResult(
            steps=len(losses),
            epochs=len(losses) / steps_per_epoch,
            final_loss=sum(recent) / len(recent),
            val_loss=val_loss,
            losses=losses,
            tokens_per_sec=steps_run * tokens_per_step / train_time if train_time else 0.0,
            elapsed_s=time.perf_counter() - started,
            sample=sample,
            checkpoint=str(checkpoint),
            device=str(device),
            num_parameters=n_params,
            peak_memory_bytes=accelerator.max_memory_allocated(device),
            vb_enabled=vb_on,
            vb_stats=vb_global.get_stats() if vb_on else None,
            log=str(log.path),
            plot=None if plot is None else str(plot),
        )
        self._report(result)
        return result

    def _announce(self, model: nn.Module, n_params: int, device: torch.device, corpus: ByteCorpus,
                  start: int, total: int, steps_per_epoch: int) -> None:
        active = vb_global.active_config()
        print(tr(
            f"训练 {type(model).__name__} ({n_params:,} 参数) 于 {device}; 数据 {corpus.source} "
            f"({len(corpus.train):,} 训练 / {len(corpus.val):,} 验证 字节); 步数 {start}→{total} "
            f"(每轮 {steps_per_epoch} 步); 虚拟Blackwell: {active.mode if active else '关闭'}",
            f"training {type(model).__name__} ({n_params:,} parameters) on {device}; data {corpus.source} "
            f"({len(corpus.train):,} train / {len(corpus.val):,} val bytes); steps {start}→{total} "
            f"({steps_per_epoch} per epoch); Virtual Blackwell: {active.mode if active else 'off'}"))

    def _report(self, r: TrainResult) -> None:
        first = f"{r.losses[0]:.3f} → " if r.losses else ""
        print(tr(
            f"完成: {r.steps} 步 ({r.epochs:.2f} 轮), 训练损失 {first}{r.final_loss:.4f}, 验证损失 {r.val_loss:.4f}, "
            f"{r.tokens_per_sec:,.0f} token/秒, 用时 {r.elapsed_s:.1f} 秒",
            f"done: {r.steps} steps ({r.epochs:.2f} epochs), train loss {first}{r.final_loss:.4f}, val loss "
            f"{r.val_loss:.4f}, {r.tokens_per_sec:,.0f} tokens/s, {r.elapsed_s:.1f} s"))
        print(tr(f"检查点: {r.checkpoint}", f"checkpoint: {r.checkpoint}"))
        print(tr(f"日志: {r.log}", f"log: {r.log}"))
        print(tr(f"损失曲线: {r.plot}", f"loss curve: {r.plot}") if r.plot else missing_matplotlib_message(r.log))
        print(tr(f"生成文本: vb generate {Path(r.checkpoint).parent.parent} --prompt \"...\"",
                 f"generate text: vb generate {Path(r.checkpoint).parent.parent} --prompt \"...\""))
        print(tr("样本:", "sample:"))
        print(r.sample)
        if r.vb_enabled:
            vb_global.print_stats()


def train(cfg: TrainConfig, model_factory: Callable[[], nn.Module] | None = None,
          resume_state: dict[str, Any] | None = None) -> TrainResult:
    """Run one training job (see ``Trainer``)."""
    return Trainer(cfg, model_factory, resume_state).run()
