"""The GGUF header reader: real files, truncated files, and headers built to hurt."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from daemon.gguf import GgufError, ModelShape, check_model_file, read_header


def header_bytes(n_tensors: int, n_keys: int, body: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys) + body


def kv_string(key: str, value: bytes, declared: int | None = None) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", declared or len(value)) + value


def test_a_real_model(gemma_path: Path) -> None:
    header = check_model_file(gemma_path)
    assert header.architecture == "gemma3" and header.version == 3
    assert len(header.tensors) > 100
    needed = header.needed_size()
    assert needed is not None and needed <= header.file_size < needed + 64
    shape = ModelShape.from_metadata(header.metadata)
    assert (shape.layers, shape.key_length, shape.vocab_size) == (18, 256, 262144)


def test_the_tiny_olmo_is_whole(tiny_olmo_path: Path) -> None:
    header = check_model_file(tiny_olmo_path)
    assert header.architecture == "olmo2" and header.needed_size() is not None


@pytest.mark.parametrize("fraction", [0.999, 0.5, 0.01])
def test_truncated_copies_are_named_truncated(gemma_path: Path, tmp_path: Path, fraction: float) -> None:
    cut = tmp_path / "cut.gguf"
    with gemma_path.open("rb") as f:
        cut.write_bytes(f.read(int(gemma_path.stat().st_size * fraction)))
    with pytest.raises(GgufError, match=r"^truncated"):
        check_model_file(cut)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "not a GGUF file"),
        (b"<html>404</html>", "not a GGUF file"),
        (b"GGUF", "truncated header"),
        (header_bytes(0, 0, version=1), "GGUF version 1 is not supported"),
        (header_bytes(2**63, 2**63), "corrupt GGUF header"),
        (header_bytes(0, 1, kv_string("general.architecture", b"x", declared=2**62)), "a string of"),
        (header_bytes(0, 1, struct.pack("<Q", 3) + b"key" + struct.pack("<I", 99)), "unknown value type 99"),
        (header_bytes(0, 1, struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 4, 2**40)), "an array of"),
        (header_bytes(0, 1, struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 77, 1) + b"\0"),
         "unknown array item type"),
        (header_bytes(0, 1, struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 3)),
         "general.alignment 3"),
        (header_bytes(0, 0), "no general.architecture"),
        (header_bytes(1, 1, kv_string("general.architecture", b"llama") + struct.pack("<Q", 1) + b"t"
                      + struct.pack("<I", 1000)), "has 1000 dimensions"),
    ],
)
def test_hostile_headers_are_errors_not_crashes(tmp_path: Path, data: bytes, needle: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GgufError, match=needle):
        check_model_file(path)


def test_metadata_without_a_shape(tmp_path: Path) -> None:
    path = tmp_path / "shapeless.gguf"
    path.write_bytes(header_bytes(0, 1, kv_string("general.architecture", b"llama")))
    with pytest.raises(GgufError, match="lacks the model's shape"):
        ModelShape.from_metadata(read_header(path).metadata)
