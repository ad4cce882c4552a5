"""How the VGPU SSD level should read its swap files: reads of one file, from the disk (its
page cache dropped first), into a host buffer like a block's staging buffer, by three methods:

  pread      ``os.preadv`` of 16 MiB chunks by a thread pool, through the page cache (what
             ``apt_model.vgpu.levels.DiskLevel.read`` does)
  direct     the same chunks with ``O_DIRECT`` (no page cache; 4 KiB-aligned buffer, offsets
             and lengths)
  mmap       the file memory-mapped and copied into the buffer (page faults and readahead)

and ``pread`` again with the file in the page cache (``pread-cached``: what a level on a
machine with RAM to spare gets). Each method reads the whole file ``--runs`` times in blocks
of ``--block-mib`` (a streamed block's size), the buffer pinned where CUDA is available (as the
stack's staging buffers are); GB/s is the median. The data read is checked against what was
written.

    python bench/ssd_read.py --dir /path/on/the/ssd --gib 4 --json ssd.json

``posix_fadvise(DONTNEED)`` drops the file's clean pages without root; where a file system
cannot do ``O_DIRECT`` (tmpfs) that row says so.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from variants import write_results

MIB = 1 << 20
CHUNK = 16 * MIB
ALIGN = 4096
METHODS = ("pread", "direct", "mmap", "pread-cached")


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory starting on a 4 KiB boundary (pinned where CUDA is available)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    skip = -raw.data_ptr() % ALIGN
    return raw[skip:skip + nbytes]


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_blocks(method: str, path: str, size: int, block: int, buffer: torch.Tensor, pool: ThreadPoolExecutor,
                check: torch.Tensor) -> float:
    """Seconds to read the file of ``size`` bytes block by block into ``buffer`` by ``method``."""
    view = memoryview(buffer.numpy())
    flags = os.O_RDONLY | (os.O_DIRECT if method == "direct" else 0)
    fd = os.open(path, flags)
    mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if method == "mmap" else None  # private: writable view
    try:
        start = time.perf_counter()
        for offset in range(0, size, block):
            n = min(block, size - offset)
            if mapped is not None:
                buffer[:n].copy_(torch.frombuffer(mapped, dtype=torch.uint8, count=n, offset=offset))
                continue

            def chunk(at: int, n: int = n, offset: int = offset) -> int:
                return os.preadv(fd, [view[at:min(at + CHUNK, n)]], offset + at)

            got = sum(pool.map(chunk, range(0, n, CHUNK)))
            if got != n:
                raise OSError(f"short read: {got} of {n} bytes at {offset}")
        seconds = time.perf_counter() - start
        if not torch.equal(buffer[:check.numel()], check):  # the last block's first bytes
            raise RuntimeError(f"{method}: the bytes read differ from those written")
        return seconds
    finally:
        if mapped is not None:
            mapped.close()
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="a directory on the disk to measure")
    parser.add_argument("--gib", type=float, default=4.0, help="size of the file read")
    parser.add_argument("--block-mib", type=int, default=256, help="bytes per block read (a streamed block)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    block = args.block_mib * MIB
    size = max(block, int(args.gib * (1 << 30)) // block * block)  # whole blocks: O_DIRECT's alignment
    fd, path = tempfile.mkstemp(prefix="vb-ssd-read-", dir=args.dir)
    rows = {}
    try:
        generator = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (block,), dtype=torch.uint8, generator=generator)
        start = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(size // block):
                f.write(data.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        write_gbps = size / (time.perf_counter() - start) / 1e9
        check = data[:MIB]
        buffer = aligned_buffer(block)
        with ThreadPoolExecutor(args.threads) as pool:
            for method in METHODS:
                times = []
                try:
                    for _ in range(args.runs):
                        if method == "pread-cached":
                            read_blocks("pread", path, size, block, buffer, pool, check)  # fill the cache
                        else:
                            drop_cache(path)
                        times.append(read_blocks(method.removesuffix("-cached"), path, size, block, buffer,
                                                 pool, check))
                except OSError as exc:
                    rows[method] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"{method:13s} not measured: {exc}", flush=True)
                    continue
                seconds = statistics.median(times)
                rows[method] = {"gbps": size / seconds / 1e9, "seconds": times}
                print(f"{method:13s} {size / seconds / 1e9:7.2f} GB/s  (median of {len(times)})", flush=True)
    finally:
        os.unlink(path)
    print(f"written at {write_gbps:.2f} GB/s (fsync'd); file {size / (1 << 30):.2f} GiB in {args.dir}, "
          f"blocks of {args.block_mib} MiB, {args.threads} threads")
    write_results(args.json, {"bench": "ssd_read", "dir": args.dir, "bytes": size, "block_bytes": block,
                              "threads": args.threads, "write_gbps": write_gbps, "rows": rows})


if __name__ == "__main__":
    main()
