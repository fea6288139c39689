"""Datasets from the Hugging Face Hub, with a quick reachability check so that offline runs fail at once."""

from __future__ import annotations

import functools
import socket
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the Hub endpoint's host name does not resolve."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def load_hub_dataset(path: str, config: str | None, split: str, data_files: dict | None = None,
                     streaming: bool = False):
    """``datasets.load_dataset`` that fails at once with ConnectionError where the Hub is unreachable."""
    if not hub_reachable():
        raise ConnectionError("the Hugging Face Hub is not reachable (offline, or its host does not resolve)")
    import datasets

    return datasets.load_dataset(path, config, split=split, data_files=data_files, streaming=streaming)
