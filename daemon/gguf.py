"""The GGUF header: metadata, tensor table, and whether the file is whole.

Read before llama.cpp ever sees a file, so a truncated download, a corrupt or a replaced file gets a
clear `GgufError` ("truncated: 131 MB of the 253 MB its tensors need") instead of whatever llama.cpp
prints, and so the memory plan (daemon/memory_plan.py) knows the model's shape. The reader trusts
nothing in the header: every count and length is bounded by what the file can hold, so a hostile
header costs an error, never a huge allocation or an endless loop. Only the file's head is read.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# An array longer than this is skipped (its length kept as an `ArrayInfo`): the vocabulary.
MAX_KEPT_ARRAY = 4096
# Bounds on a header's own counts (real files: ~40 keys, ~1,000 tensors, strings of ~100 KB).
MAX_KEYS = 100_000
MAX_TENSORS = 1_000_000
MAX_DIMS = 8
MAX_STRING_BYTES = 64 * 1024 * 1024

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")

# ggml type id -> (elements per block, bytes per block), as ggml defines them; a type missing here
# (newer than this table) only means the file's completeness is not checked.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}


class GgufError(ValueError):
    """Not a usable GGUF file; the message says what is wrong with it."""


@dataclass(frozen=True)
class ArrayInfo:
    """A long array (the vocabulary) that was skipped over; only its length is kept."""

    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    def nbytes(self) -> int | None:
        block = GGML_BLOCKS.get(self.ggml_type)
        if block is None:
            return None
        elements = 1
        for dim in self.shape:
            elements *= dim
        per_block, block_bytes = block
        return -(-elements // per_block) * block_bytes


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where the tensor data starts in the file
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def needed_size(self) -> int | None:
        """Bytes the file must have for every tensor to be in it; None when a type is unknown."""
        end = self.data_offset
        for tensor in self.tensors:
            size = tensor.nbytes()
            if size is None:
                return None
            end = max(end, self.data_offset + tensor.offset + size)
        return end


def read_header(path: Path, *, tensors: bool = True) -> GgufHeader:
    """Parse a GGUF (v2/v3) header. Raises GgufError (bad or truncated header) or OSError."""
    path = Path(path)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(MAGIC):
            raise GgufError(f"not a GGUF file (it has {size} bytes)")
        # Mapped, not read: a 262k-token vocabulary is 262k small strings, parsed in place.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Reader(data, size).header(tensors)


def check_model_file(path: Path) -> GgufHeader:
    """The header, after checking the file is a GGUF that holds all its tensors. GgufError with a
    message a person can act on otherwise; OSError when it cannot be read at all."""
    header = read_header(path)
    if not header.architecture:
        raise GgufError("corrupt GGUF: no general.architecture in its metadata")
    needed = header.needed_size()
    if needed is not None and header.file_size < needed:
        raise GgufError(
            f"truncated: the file has {header.file_size} bytes but its tensors need {needed} "
            f"({header.file_size / needed:.0%}); an interrupted copy or download? fetch it again"
        )
    return header


class _Reader:
    def __init__(self, data: mmap.mmap, size: int) -> None:
        self.data = data
        self.size = size
        self.pos = 0

    def read(self, n: int) -> bytes:
        if n > self.size - self.pos:
            raise GgufError(f"truncated header: the file ends at byte {self.size}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> Any:
        width = struct.calcsize(fmt)
        if width > self.size - self.pos:
            raise GgufError(f"truncated header: the file ends at byte {self.size}")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += width
        return value

    def remaining(self) -> int:
        return self.size - self.pos

    def skip_strings(self, n: int) -> None:
        unpack, data, pos, end = _U64.unpack_from, self.data, self.pos, self.size - 8
        for _ in range(n):
            if pos > end:
                raise GgufError(f"truncated header: the file ends at byte {self.size}")
            pos += 8 + unpack(data, pos)[0]
        if pos > self.size:
            raise GgufError(f"truncated header: the file ends at byte {self.size}")
        self.pos = pos

    def skip(self, n: int) -> None:
        if n > self.remaining():
            raise GgufError(f"truncated header: the file ends at byte {self.size}")
        self.pos += n

    def header(self, with_tensors: bool) -> GgufHeader:
        head = bytes(self.data[:4])
        self.pos = 4
        if head != MAGIC:
            raise GgufError(f"not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
        version = self.unpack("<I")
        if not 2 <= version <= 3:
            raise GgufError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = self.unpack("<Q")
        n_keys = self.unpack("<Q")
        if n_keys > MAX_KEYS or n_tensors > MAX_TENSORS:
            raise GgufError(f"corrupt GGUF header: {n_keys} keys and {n_tensors} tensors")
        metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key = self.string()
            metadata[key] = self.value(self.unpack("<I"))
        infos: list[TensorInfo] = []
        if with_tensors:
            for _ in range(n_tensors):
                infos.append(self.tensor_info())
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GgufError(f"corrupt GGUF header: general.alignment {alignment!r}")
        position = self.pos
        data_offset = -(-position // alignment) * alignment if with_tensors else position
        return GgufHeader(version, metadata, tuple(infos), data_offset, self.size)

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > min(MAX_STRING_BYTES, self.remaining()):
            raise GgufError(f"corrupt GGUF header: a string of {length} bytes at byte {self.pos}")
        return self.read(length).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind = self.unpack("<I")
            n = self.unpack("<Q")
            if n > self.remaining():  # every item takes at least one byte
                raise GgufError(f"corrupt GGUF header: an array of {n} items at byte {self.pos}")
            if item_kind in _SCALARS:
                fmt = _SCALARS[item_kind]
                width = struct.calcsize(fmt)
                if n > MAX_KEPT_ARRAY:
                    if n * width > self.remaining():
                        raise GgufError(f"truncated header: an array of {n} items does not fit the file")
                    self.skip(n * width)
                    return ArrayInfo(n)
                return list(struct.unpack(f"<{n}{fmt[1]}", self.read(n * width)))
            if item_kind not in (_STRING, _ARRAY):
                raise GgufError(f"corrupt GGUF header: unknown array item type {item_kind}")
            if item_kind == _STRING and n > MAX_KEPT_ARRAY:
                self.skip_strings(n)  # the vocabulary: only where it ends matters
                return ArrayInfo(n)
            items = [self.value(item_kind) for _ in range(n)]
            return ArrayInfo(n) if n > MAX_KEPT_ARRAY else items
        if kind not in _SCALARS:
            raise GgufError(f"corrupt GGUF header: unknown value type {kind} at byte {self.pos - 4}")
        return self.unpack(_SCALARS[kind])

    def tensor_info(self) -> TensorInfo:
        name = self.string()
        n_dims = self.unpack("<I")
        if n_dims > MAX_DIMS:
            raise GgufError(f"corrupt GGUF header: tensor {name[:60]!r} has {n_dims} dimensions")
        shape = struct.unpack(f"<{n_dims}Q", self.read(8 * n_dims))
        ggml_type = self.unpack("<I")
        offset = self.unpack("<Q")
        return TensorInfo(name, tuple(shape), ggml_type, offset)


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs from the metadata: layers, KV heads, head sizes, vocabulary, the
    feed-forward width and whether some layers attend over a sliding window."""

    architecture: str
    layers: int
    kv_heads_total: int  # summed over layers (models may vary it per layer)
    key_length: int
    value_length: int
    embedding_length: int
    vocab_size: int
    feed_forward_length: int = 0  # the widest layer's
    sliding_window: bool = False

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ModelShape:
        arch = str(meta.get("general.architecture", ""))
        try:
            layers = int(meta[f"{arch}.block_count"])
            heads = meta[f"{arch}.attention.head_count"]
            heads_kv = meta.get(f"{arch}.attention.head_count_kv", heads)
            embd = int(meta[f"{arch}.embedding_length"])
            first_heads = int(heads[0] if isinstance(heads, list) else heads)
            key_len = int(meta.get(f"{arch}.attention.key_length", embd // max(first_heads, 1)))
            value_len = int(meta.get(f"{arch}.attention.value_length", key_len))
            per_layer = heads_kv if isinstance(heads_kv, list) else [heads_kv] * layers
            kv_heads_total = sum(int(h) for h in per_layer[:layers])
        except (KeyError, TypeError, ValueError) as exc:
            raise GgufError(f"the metadata of architecture {arch!r} lacks the model's shape ({exc})") from None
        ff = meta.get(f"{arch}.feed_forward_length", 0)
        try:  # only the compute estimate needs it: unreadable (a per-layer list as text) counts as 0
            feed_forward = max((int(x) for x in ff), default=0) if isinstance(ff, list) else int(ff)
        except (TypeError, ValueError):
            feed_forward = 0
        sliding = bool(meta.get(f"{arch}.attention.sliding_window"))
        tokens = meta.get("tokenizer.ggml.tokens")
        token_count = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else 0
        vocab = int(meta.get(f"{arch}.vocab_size", token_count))
        return cls(arch, layers, kv_heads_total, key_len, value_len, embd, vocab, feed_forward, sliding)
