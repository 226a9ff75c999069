"""Read safetensors tensors straight onto a GPU, at the speed of the page cache and the PCIe link.

Reading a tensor through safetensors' CPU view copies it from the memory map into pageable memory on one thread,
and the copy to the GPU then goes through the driver's small staging buffers: ~2 GB/s. Here several threads read a
tensor's byte range from the file (`os.preadv`, which releases the GIL) into one of two pinned buffers, the copy
of that piece to the GPU is queued without waiting, and the next piece is read into the other buffer meanwhile.
The header (names, dtypes, shapes, byte ranges) is parsed here, and every range is checked against the file's size,
so a truncated file is found before any byte is read.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mistral_chat.errors import ModelFilesError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
          "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}
PIECE = 128 << 20  # bytes per pinned buffer: one piece is read while the previous one is copied to the GPU
THREADS = 8  # readers per piece
_HEADER_LIMIT = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, with absolute byte ranges; ModelFilesError if the header is bad or a
    range lies past the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelFilesError(f"{path} is truncated or corrupt ({exc}): delete it and download it again with "
                              "`mistral-chat pull`") from exc
    start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (start + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFilesError(f"{path}: tensor '{name}' has an entry this reader does not know ({exc}): "
                                  "re-download the model") from exc
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or end > size:
            raise ModelFilesError(f"{path} is truncated or corrupt (tensor '{name}' needs bytes {begin}-{end} of "
                                  f"{size}): delete it and download it again with `mistral-chat pull`")
        entries[name] = TensorEntry(dtype, shape, begin, end)
    return entries


class GpuReader:
    """Byte ranges of files onto one GPU through two pinned buffers (see the module's docstring). One thread uses
    it; `close` frees the buffers and the reading threads."""

    def __init__(self, device: torch.device, piece: int = PIECE, threads: int = THREADS) -> None:
        self.device = device
        self._cuda = device.type == "cuda"  # elsewhere (the tests' CPU runs) no pinning and no events
        self.piece = piece
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="weights-read")
        self._buffers: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._fds: dict[Path, int] = {}

    def _buffer(self, turn: int) -> torch.Tensor:
        while len(self._buffers) <= turn:
            try:
                buffer = torch.empty(self.piece, dtype=torch.uint8, pin_memory=self._cuda)
            except RuntimeError:  # no page-locked memory to be had: pageable, slower but the same bytes
                buffer = torch.empty(self.piece, dtype=torch.uint8)
            self._buffers.append(buffer)
        return self._buffers[turn]

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, path: Path, entry: TensorEntry, begin: int | None = None, end: int | None = None
             ) -> torch.Tensor:
        """Bytes [begin, end) of the file (default: the whole tensor) on the GPU, as a uint8 tensor; the copy is
        queued on the current stream, so work queued after it sees the bytes."""
        begin = entry.begin if begin is None else begin
        end = entry.end if end is None else end
        out = torch.empty(end - begin, dtype=torch.uint8, device=self.device)
        fd = self._fd(path)
        for offset in range(0, end - begin, self.piece):
            n = min(self.piece, end - begin - offset)
            turn = self._turn
            self._turn ^= 1
            buffer = self._buffer(turn)
            if self._copied[turn] is not None:
                self._copied[turn].synchronize()  # the copy queued from this buffer two pieces ago is done
            self._fill(fd, path, buffer, n, begin + offset)
            out[offset:offset + n].copy_(buffer[:n], non_blocking=self._cuda)
            if self._cuda:
                event = torch.cuda.Event()
                event.record()
                self._copied[turn] = event
        return out

    def _fill(self, fd: int, path: Path, buffer: torch.Tensor, n: int, file_offset: int) -> None:
        view = memoryview(buffer.numpy())
        step = max(1 << 20, -(-n // self.threads))

        def read_part(start: int) -> None:
            stop = min(start + step, n)
            while start < stop:
                got = os.preadv(fd, [view[start:stop]], file_offset + start)
                if got <= 0:
                    raise ModelFilesError(f"{path} ended early (at byte {file_offset + start}): it is truncated, "
                                          "download it again with `mistral-chat pull`")
                start += got

        try:
            for future in [self._pool.submit(read_part, s) for s in range(0, n, step)]:
                future.result()
        except OSError as exc:
            raise ModelFilesError(f"could not read {path} ({exc}): check the disk, or download it again") from exc

    def close(self) -> None:
        for event in self._copied:
            if event is not None:
                event.synchronize()
        self._pool.shutdown()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffers.clear()


def read_tensor(reader: GpuReader, path: Path, entry: TensorEntry, rows: slice | None = None,
                cols: slice | None = None) -> torch.Tensor:
    """The tensor (optionally some of its rows, read alone, or columns, cut on the GPU) in its stored dtype."""
    shape = entry.shape
    row_bytes = entry.dtype.itemsize
    for d in shape[1:]:
        row_bytes *= d
    if rows is not None:
        first, stop, _ = rows.indices(shape[0])
        raw = reader.read(path, entry, entry.begin + first * row_bytes, entry.begin + stop * row_bytes)
        shape = (stop - first, *shape[1:])
    else:
        raw = reader.read(path, entry)
    t = raw.view(entry.dtype).view(shape)
    return t[:, cols] if cols is not None else t
