"""The bundled deployment's model and input step, in process: no server, no GPU, no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prefect.logging import disable_run_logger

from prefect_gpu_flows import GpuDeviceError, GpuLease, inference
from prefect_gpu_flows.inference import (
    DIMENSIONS,
    SentenceEncoder,
    load_documents,
    load_encoder,
    slot_encoder,
)

PARAPHRASES = [
    ("The cat sat on the mat.", "A cat was sitting on the rug."),
    ("How do I reset my password?", "I forgot my password and need to change it."),
    ("The train to Berlin is delayed by an hour.", "Our Berlin train arrives sixty minutes late."),
]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return load_encoder()


def test_paraphrases_are_closer_than_unrelated_texts(encoder: SentenceEncoder) -> None:
    vectors = encoder.embed([text for pair in PARAPHRASES for text in pair])
    assert vectors.shape == (2 * len(PARAPHRASES), DIMENSIONS)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    cosine = vectors @ vectors.T
    paired = [cosine[2 * i, 2 * i + 1] for i in range(len(PARAPHRASES))]
    n = len(vectors)
    unrelated = [cosine[i, j] for i in range(n) for j in range(i + 1, n) if i // 2 != j // 2]
    assert min(paired) > 0.5, paired
    assert max(unrelated) < 0.3, unrelated
    assert min(paired) > max(unrelated) + 0.2


def test_padding_and_batching_do_not_change_a_text_s_vector(encoder: SentenceEncoder) -> None:
    short, long = "GPU", "A much longer sentence that makes the batch pad the short one. " * 5
    alone = encoder.embed([short])
    padded = encoder.embed([short, long])  # the short text gets many padding tokens
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)
    texts = [f"document number {i} about {topic}" for i, topic in enumerate("abcdefg")]
    np.testing.assert_allclose(encoder.embed(texts, batch_size=3), encoder.embed(texts), atol=1e-5)


def test_long_and_empty_inputs(encoder: SentenceEncoder) -> None:
    assert encoder.embed(["word " * 5000]).shape == (1, DIMENSIONS)  # truncated, not an error
    assert encoder.embed([]).shape == (0, DIMENSIONS)


OFFLINE_PROBE = """
import socket

def no_network(*args, **kwargs):
    raise OSError("network access attempted")

socket.socket.connect = socket.socket.connect_ex = socket.create_connection = no_network
from prefect_gpu_flows.inference import load_encoder

encoder = load_encoder()
print(encoder.device, encoder.embed(["offline"]).shape)
"""


def test_loads_offline_from_installed_files_only(tmp_path: Path) -> None:
    """A fresh process with every socket connect refused and an empty HOME and caches."""
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    probe = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[-2] == f"cpu (1, {DIMENSIONS})"


def test_the_cpu_encoder_is_loaded_once_per_process_and_kept_after_a_slot() -> None:
    assert load_encoder() is load_encoder()
    assert load_encoder(None) is load_encoder()
    lease = GpuLease("gpu:n", ("0",), pinned=True, cuda_index=0)
    with slot_encoder(lease) as encoder:  # no CUDA provider here: the CPU
        assert encoder is load_encoder()
    assert encoder.embed(["still open"]).shape == (1, DIMENSIONS)


def test_a_cuda_encoder_lives_only_as_long_as_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a CUDA provider, each slot loads its own session and drops it when the slot ends
    (a CPU session stands in for the CUDA one here)."""
    monkeypatch.setattr(inference.ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    loaded: list[int | None] = []
    real_load = inference._load

    def load(device: int | None) -> SentenceEncoder:
        loaded.append(device)
        return real_load(None)

    monkeypatch.setattr(inference, "_load", load)
    lease = GpuLease("gpu:n", ("GPU-a",), pinned=True, cuda_index=0)
    with slot_encoder(lease) as first:
        assert first.embed(["inside"]).shape == (1, DIMENSIONS)
    with slot_encoder(lease) as second:
        assert second is not first
    assert loaded == [0, 0]
    for encoder in (first, second):
        with pytest.raises(RuntimeError, match="closed"):
            encoder.embed(["after the slot"])

    unreachable = GpuLease("gpu:n", ("GPU-b",), unpinned_reason="CUDA was initialised ...")
    refused = "cannot run on GPU-b: CUDA was initialised"
    with pytest.raises(GpuDeviceError, match=refused), slot_encoder(unreachable):
        pytest.fail("ran on a device CUDA cannot reach")


def test_load_documents_defaults_to_the_bundled_samples() -> None:
    with disable_run_logger():
        documents = load_documents.fn()
    assert len(documents) == 12
    assert documents[0].id == "gpu-limit-1"
    assert all(document.text for document in documents)


def test_load_documents_reads_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "first"}\n\n{"text": "second"}\n', encoding="utf-8")
    with disable_run_logger():
        documents = load_documents.fn(str(path))
    assert [(d.id, d.text) for d in documents] == [("a", "first"), ("3", "second")]


def test_load_documents_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with disable_run_logger(), pytest.raises(ValueError, match=r"docs\.jsonl:2: .*'text'"):
        load_documents.fn(str(path))
