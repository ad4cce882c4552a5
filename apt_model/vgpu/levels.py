"""The level stores: Level 0 on the compute device, host RAM, and swap files on an SSD.

Each store allocates the buffers of its level and counts the bytes it really holds
(:class:`~apt_model.vgpu.stats.LevelCounters`). Level 0 refuses an allocation past its
capacity. Host RAM is page-locked (pinned) when the compute device is CUDA, so copies to
the card are asynchronous; where pinning is refused (``ulimit -l``) it falls back to pageable
memory with one warning. The SSD level keeps one swap file per block in a folder of its own
under the configured directory: written once at placement (space reserved first, so a full
disk fails there, not later), memory-mapped (what the block's tensors show between uses),
and read for streaming with ``pread`` by a small thread pool, each read checked for length.
Each swap file keeps one descriptor open: the first one stored raises the process's soft
limit on open files to its hard limit, and running out of descriptors is a one-line error.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import time
import uuid
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from apt_model.errors import VBConfigError, VBDataError, first_line
from apt_model.i18n import tr
from apt_model.storage import free_bytes, human_bytes, is_disk_full
from apt_model.vgpu.stats import LevelCounters

LEVEL_DEVICES = ("cpu", "ssd")  # the host levels; any other level names an accelerator

MIB = 1 << 20
HOST_CHUNK = 256 * MIB  # bytes per host allocation: torch's pinned allocator rounds each one up to a power of two
HOST_ALIGN = 64
READ_CHUNK = 16 * MIB  # bytes one pread asks for; a block's chunks are read in parallel
READ_THREADS = 4


class LevelSpec(Protocol):
    """One configured level (``vgpu_config.levels[i]``): capacity in MiB, "cpu", "ssd" or a
    compute device, the configured link speed, and the SSD level's directory."""

    capacity_mb: float
    device: str
    speed_gbps: float
    path: str | None


def capacity_bytes(spec: LevelSpec) -> int:
    return int(spec.capacity_mb * MIB)


def copy_gbps(src: torch.device, dst: torch.device, nbytes: int = 64 * MIB, repeats: int = 3) -> float:
    """The link's speed, measured: the best of ``repeats`` copies of ``nbytes`` from ``src``
    to ``dst`` (host memory pinned where the other end is CUDA), in GB/s."""
    cuda = [d for d in (src, dst) if d.type == "cuda"]

    def buffer(device: torch.device) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=device.type == "cpu" and bool(cuda))

    source, target = buffer(src), buffer(dst)
    best = float("inf")
    for _ in range(repeats):
        for device in cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source, non_blocking=bool(cuda))
        for device in cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def default_swap_dir() -> Path:
    """Where the SSD level writes when its ``path`` is not given: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "apt_model" / "vgpu"


def _counters(index: int, spec: LevelSpec, device: str) -> LevelCounters:
    return LevelCounters(index=index, device=device, capacity_bytes=capacity_bytes(spec),
                         speed_gbps=spec.speed_gbps)


class DeviceLevel:
    """Level 0: what the stack holds on the compute device, never more than its capacity."""

    def __init__(self, spec: LevelSpec, device: torch.device) -> None:
        self.device = device
        self.counters = _counters(0, spec, str(device))

    def _check(self, nbytes: int) -> None:
        c = self.counters
        if c.resident_bytes + nbytes > c.capacity_bytes:
            raise VBConfigError(tr(
                f"VGPU Level 0 ({human_bytes(c.capacity_bytes)}) 已持有 {human_bytes(c.resident_bytes)}，"
                f"放不下 {human_bytes(nbytes)}",
                f"VGPU Level 0 ({human_bytes(c.capacity_bytes)}) holds {human_bytes(c.resident_bytes)} "
                f"and cannot take {human_bytes(nbytes)} more"))

    def allocate(self, nbytes: int) -> Tensor:
        """A ``uint8`` buffer of ``nbytes`` on the device; refused past the capacity."""
        self._check(nbytes)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.counters.hold(buf.untyped_storage().nbytes())
        return buf

    def adopt(self, nbytes: int) -> None:
        """Count ``nbytes`` of storage already on the device (tensors left where they were)."""
        self._check(nbytes)
        self.counters.hold(nbytes)

    def close(self) -> None:
        """Stop counting (the caller dropped the buffers and made sure no copy still uses them)."""
        self.counters.release(self.counters.resident_bytes)


def pinned_empty(nbytes: int) -> Tensor:
    """``nbytes`` of page-locked host memory (raises ``RuntimeError`` where refused)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class HostMemory:
    """Host buffers for one stack: page-locked while ``pin`` holds; the first refusal turns
    pinning off, with one warning, and later buffers are pageable."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin

    def empty(self, nbytes: int) -> Tensor:
        if self.pin:
            try:
                return pinned_empty(nbytes)
            except RuntimeError as exc:
                self.pin = False
                reason = first_line(exc)
                warnings.warn(tr(
                    f"VGPU: 无法锁页主机内存 ({reason})，改用可分页内存 (拷贝较慢; 检查 ulimit -l)",
                    f"VGPU: page-locked host memory refused ({reason}); using pageable memory "
                    "(slower copies; check ulimit -l)"), RuntimeWarning, stacklevel=2)
        return torch.empty(nbytes, dtype=torch.uint8)


def host_aligned(n: int) -> int:
    """``n`` bytes rounded up to ``HOST_ALIGN``: where the next tensor carved after them starts."""
    return -(-n // HOST_ALIGN) * HOST_ALIGN


class HostArena:
    """Host tensors carved from a few large buffers of ``memory`` for tensors of ``sizes``
    bytes (``HOST_CHUNK`` each, or all that is still to come when less; a larger tensor gets
    its own), each aligned to ``HOST_ALIGN`` bytes: pinned buffers waste little that way.
    ``held_bytes``: the bytes of the buffers taken so far."""

    def __init__(self, memory: HostMemory, sizes: Sequence[int]) -> None:
        self.memory = memory
        self._left = sum(host_aligned(n) for n in sizes)
        self._chunks: list[Tensor] = []
        self._used = 0
        self.held_bytes = 0

    def take_bytes(self, nbytes: int) -> Tensor:
        """``nbytes`` of host memory, as a flat ``uint8`` tensor."""
        size = host_aligned(nbytes)
        if not self._chunks or self._used + size > self._chunks[-1].numel():
            self._chunks.append(self.memory.empty(max(min(HOST_CHUNK, self._left), size)))
            self._used = 0
            self.held_bytes += self._chunks[-1].untyped_storage().nbytes()
        out = self._chunks[-1][self._used:self._used + nbytes]
        self._used += size
        self._left -= size
        return out

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """An uninitialized host tensor of ``shape`` and ``dtype``."""
        return self.take_bytes(shape.numel() * dtype.itemsize).view(dtype).view(shape)

    def release(self) -> None:
        """Drop the buffers (their memory is freed once no tensor taken from them is left)."""
        self._chunks.clear()
        self.held_bytes = 0


class HostLevel:
    """A host RAM level: its blocks' buffers, carved for blocks of ``sizes`` bytes from
    ``memory``."""

    def __init__(self, index: int, spec: LevelSpec, memory: HostMemory, sizes: Sequence[int]) -> None:
        self.counters = _counters(index, spec, "cpu")
        self.arena = HostArena(memory, sizes)

    def allocate(self, nbytes: int) -> Tensor:
        before = self.arena.held_bytes
        buf = self.arena.take_bytes(nbytes)
        self.counters.hold(self.arena.held_bytes - before)
        return buf

    def close(self) -> None:
        self.counters.release(self.arena.held_bytes)
        self.arena.release()


def swap_dir(spec: LevelSpec, needed: int) -> Path:
    """The SSD level's directory, checked before anything is written: a given one must exist
    and be a writable folder (the default one is created when the plan uses it), with
    ``needed`` bytes free."""
    folder = Path(spec.path).expanduser() if spec.path else default_swap_dir()
    if not spec.path and needed:
        folder.mkdir(parents=True, exist_ok=True)
    if not spec.path and not needed:
        return folder
    if not folder.is_dir():
        raise VBDataError(tr(f"VGPU SSD目录不存在: {folder}", f"VGPU SSD directory does not exist: {folder}"))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VBDataError(tr(f"VGPU SSD目录不可写: {folder}", f"VGPU SSD directory is not writable: {folder}"))
    free = free_bytes(folder)
    if free < needed:
        raise VBDataError(tr(
            f"VGPU SSD目录 {folder} 剩余 {human_bytes(free)}，计划需要 {human_bytes(needed)}",
            f"VGPU SSD directory {folder} has {human_bytes(free)} free; the plan needs {human_bytes(needed)}"))
    return folder


def _writable(t: Tensor) -> memoryview:
    """A CPU tensor's bytes as a writable buffer (what ``os.preadv`` fills)."""
    return memoryview((ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())).cast("B")


def _remove(folder: Path, fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
    shutil.rmtree(folder, ignore_errors=True)


@functools.cache
def allow_open_files() -> None:
    """Raise this process's soft limit on open files to its hard limit, once (the SSD level
    keeps a descriptor per swap file). A no-op where the platform has no such limit."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # refused (macOS caps the soft limit): keep the soft one
            pass


class DiskLevel:
    """The SSD level: one swap file per stored block, in a folder of its own under
    ``directory`` (made at the first block stored)."""

    def __init__(self, index: int, spec: LevelSpec, directory: Path) -> None:
        self.counters = _counters(index, spec, "ssd")
        self.directory = directory
        self.folder: Path | None = None
        self._fds: list[int] = []
        self._files: dict[int, tuple[int, Path, int]] = {}  # key -> (fd, path, nbytes)
        self._pool: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None
        self.staging_bytes = 0  # host buffers that reads land in before a copy to the device

    def store(self, key: int, nbytes: int) -> Tensor:
        """A new swap file of ``nbytes`` (space reserved), memory-mapped as a ``uint8`` tensor."""
        if self.folder is None:
            self.folder = self.directory / f"vgpu-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.folder.mkdir()
            self._finalizer = weakref.finalize(self, _remove, self.folder, self._fds)
        path = self.folder / f"block{key}.bin"
        fd = self._open(path)
        self._fds.append(fd)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if is_disk_full(exc):
                raise VBDataError(tr(f"VGPU SSD目录 {self.directory} 空间不足，无法写入 {human_bytes(nbytes)}",
                                     f"VGPU SSD directory {self.directory} is full: cannot write "
                                     f"{human_bytes(nbytes)}")) from None
            os.ftruncate(fd, nbytes)  # a file system without fallocate
        self._files[key] = (fd, path, nbytes)
        self.counters.hold(nbytes)
        storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=nbytes)
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))

    def _open(self, path: Path) -> int:
        """A descriptor of the new swap file ``path``, with one more to spare for the memory
        map ``store`` makes (it opens the file again, then closes it); out of descriptors:
        one line."""
        allow_open_files()
        fd = -1
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(os.dup(fd))
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if fd >= 0:
                os.close(fd)
            raise VBConfigError(tr(
                f"VGPU SSD 层级: 打开的文件数已达上限 ({len(self._files)} 个交换文件已打开，每个占一个文件描述符)；"
                "请提高上限 (ulimit -n) 或把更多状态放进主机内存层级",
                f"VGPU SSD level: out of file descriptors ({len(self._files)} swap files open, one descriptor "
                "each); raise the limit (ulimit -n) or give the host RAM levels more room")) from None
        return fd

    def check(self, key: int) -> None:
        """Fail clearly if swap file ``key`` was deleted or became shorter than what was written
        (touching a memory-mapped page past its end would kill the process)."""
        fd, path, nbytes = self._files[key]
        status = os.fstat(fd)
        if status.st_nlink == 0:
            raise VBDataError(tr(f"VGPU交换文件 {path} 已被删除；其中的数据在本进程结束时丢失，请重新构建或加载模型",
                                 f"VGPU swap file {path} was deleted; the data it holds is lost when this process "
                                 "ends: build or load the model again"))
        if status.st_size < nbytes:
            raise VBDataError(self._truncated(path, status.st_size, nbytes))

    def read(self, key: int, into: Tensor) -> None:
        """Read block ``key``'s swap file into the CPU tensor ``into``, in parallel chunks,
        each read checked for length."""
        self.check(key)
        fd, path, nbytes = self._files[key]
        view = _writable(into[:nbytes])

        def read_chunk(start: int) -> int:
            return os.preadv(fd, [view[start:start + READ_CHUNK]], start)

        starts = range(0, nbytes, READ_CHUNK)
        if len(starts) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="vgpu-read")
            got = sum(self._pool.map(read_chunk, starts))
        else:
            got = sum(map(read_chunk, starts))
        if got < nbytes:
            raise VBDataError(self._truncated(path, got, nbytes))

    @staticmethod
    def _truncated(path: Path, size: int, nbytes: int) -> str:
        return tr(f"VGPU交换文件 {path} 被截断: 只有 {size} 字节，应有 {nbytes}；其中的权重已丢失，请重新构建或加载模型",
                  f"VGPU swap file {path} is truncated: {size} of {nbytes} bytes; the weights it held are "
                  "lost: build or load the model again")

    def close(self) -> None:
        """Delete the swap files and their folder."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for _, _, nbytes in self._files.values():
            self.counters.release(nbytes)
        self._files.clear()
        if self._finalizer is not None:
            self._finalizer()
