"""Models named by Hugging Face Hub id (``org/name``, optionally ``org/name@revision``), resolved through
``huggingface_hub`` into the standard HF cache — ``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``
honoured as every HF tool does — so that a model id works wherever ``from_pretrained`` would take it.

Every failure is one ``UserError`` that says what to do: offline and not cached names the cache searched; an unknown
id, revision or a gated model names the token; an unreachable hub names ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from megl_ray.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
"""What a process that needs only a model's config and tokenizer fetches (no weights): the driver's share."""
_TRUE = ("1", "on", "yes", "true")


def is_hub_id(name: str) -> bool:
    """``org/name`` or ``org/name@revision``, and not a path that exists here (a local ``org/name`` folder wins, as
    it does for ``from_pretrained``)."""
    return bool(HUB_ID.match(name)) and not os.path.exists(name)


def split_revision(name: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no ``@``: the default branch (None)."""
    repo, _, revision = name.partition("@")
    return repo, revision or None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (``huggingface_hub`` reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or huggingface_hub.constants.HF_HUB_OFFLINE


def cache_dir() -> str:
    """The HF cache searched: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, as set now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return huggingface_hub.constants.HF_HUB_CACHE


def snapshot(name: str, allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot folder of hub id ``name`` (downloaded into the HF cache when online and missing; with
    ``allow_patterns`` only the matching files)."""
    repo, revision = split_revision(name)
    where = cache_dir()
    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=where,
                local_files_only=offline(),
                allow_patterns=allow_patterns,
                token=os.environ.get("HF_TOKEN") or None,
            )
        )
    except LocalEntryNotFoundError:
        pinned = f" at revision {revision}" if revision else ""
        raise UserError(
            f"{name}: not in the HF cache at {where}{pinned} (HF_HUB_OFFLINE is set, or the hub is unreachable): "
            f"download it where the hub is reachable (`hf download {repo}`) into that cache, or give a local folder"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{name}: the hub has no revision {revision!r} of {repo}") from None
    except GatedRepoError:
        raise UserError(f"{name}: a gated model: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{name}: no such model on the hub (a private one needs HF_TOKEN)") from None
    except HFValidationError as err:
        raise UserError(f"{name}: not a valid hub id ({str(err).splitlines()[0]})") from None
    except (HfHubHTTPError, OSError) as err:
        raise UserError(
            f"{name}: cannot fetch from the hub ({str(err).splitlines()[0]}); set HF_HUB_OFFLINE=1 to use the "
            f"cache at {where} only"
        ) from None
