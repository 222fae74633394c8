"""The Hugging Face Hub: HF model snapshots in the local hub cache, downloaded when missing.

`cached` finds a snapshot in `hub_cache_dir()`; `download` fetches the files that match the given
names or patterns with huggingface_hub's `snapshot_download` from `endpoint()` (both read from the
environment at call time), under its progress bars (off with the others: `logs.hub_tqdm_class`).
huggingface_hub does the rest: the token (HF_TOKEN or `hf auth login`), finished files kept in the
cache's blobs (a rerun fetches only what is missing; a part-written file is dropped) and a dropped
connection resumed from the last whole 10 MB chunk (HTTP Range, a few tries). With HF_HUB_OFFLINE=1
nothing goes to the network.

Failures are one-line errors naming the model and what to do: PermissionError (gated or private),
FileNotFoundError (no such repo; not cached while offline), ConnectionError (the Hub unreachable
or failing).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from jaxcircuits import logs

LOGIN = "HF_TOKEN or `hf auth login`"


def hub_cache_dir() -> str:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default (``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE


def endpoint() -> str:
    """``$HF_ENDPOINT``, else huggingface_hub's (https://huggingface.co)."""
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now or when huggingface_hub was imported."""
    from huggingface_hub import constants
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.upper() in constants.ENV_VARS_TRUE_VALUES


def cached(model_id: str, files: Sequence[str]) -> Optional[str]:
    """The snapshot directory of HF model `model_id` in the local hub cache holding `files` (names or
    patterns; a snapshot whose download was cut short does not count), or None; never the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(model_id, cache_dir=hub_cache_dir(), local_files_only=True,
                                 allow_patterns=list(files))
    except LocalEntryNotFoundError:
        return None


def download(model_id: str, files: Sequence[str]) -> str:
    """Download the files of HF model `model_id` matching `files` (names or patterns, top-level) into
    the local hub cache -> its snapshot directory. Raises the one-line errors of the module docstring."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    logs.quiet_handlers()          # huggingface_hub's own console handler, added when it was imported
    url = endpoint()
    if offline():
        raise FileNotFoundError(
            f"HF model {model_id!r} is not in the local HF hub cache {hub_cache_dir()} and HF_HUB_OFFLINE=1 is "
            f"set: unset it to download the model, or run `hf download {model_id}` where the Hub is reachable")
    try:
        return snapshot_download(model_id, cache_dir=hub_cache_dir(), endpoint=url, allow_patterns=list(files),
                                 ignore_patterns=["*/*"], tqdm_class=logs.hub_tqdm_class())
    except GatedRepoError as e:
        raise PermissionError(f"HF model {model_id!r} on {url} is gated or private: accept its licence on the "
                              f"Hub and log in ({LOGIN})") from e
    except RepositoryNotFoundError as e:
        if _status(e) == 404:
            raise FileNotFoundError(f"HF model {model_id!r} does not exist on {url} (404): check the name "
                                    "'org/name', or pass a local directory or .gguf file") from e
        raise PermissionError(f"HF model {model_id!r} on {url} does not exist, or is gated or private "
                              f"({_status(e)}): check the name; to read a gated or private model accept its "
                              f"licence on the Hub and log in ({LOGIN})") from e
    except HfHubHTTPError as e:
        raise ConnectionError(f"{url} answered {_status(e)} while downloading HF model {model_id!r}: "
                              f"{str(e).splitlines()[0]}; retry later, or pass a local directory") from e
    except LocalEntryNotFoundError as e:
        if isinstance(e.__cause__, HfHubHTTPError):
            raise ConnectionError(f"{url} answered {_status(e.__cause__)} for HF model {model_id!r}: the Hub "
                                  "may be down; retry later, or pass a local directory") from e
        raise ConnectionError(f"cannot reach {url} to download HF model {model_id!r}: no network? set "
                              "HF_HUB_OFFLINE=1 to use the cache only, or pass a local directory") from e
    except _transport_error() as e:                # after the retries of a file cut short
        raise ConnectionError(f"lost the connection to {url} while downloading HF model {model_id!r} ({e}): "
                              "load it again to fetch the files still missing") from e


def _status(e) -> Optional[int]:
    """The HTTP status of a huggingface_hub HTTP error (None without a response)."""
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _transport_error() -> type:
    """The HTTP client's connection-failure class: httpx2's under huggingface_hub 2, httpx's under 1."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http.TransportError
