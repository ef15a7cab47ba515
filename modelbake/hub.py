"""The Hugging Face hub: one way to fetch a model repository, for the reranker stage and for bundles.

A revision (branch, tag or commit) is resolved to its commit once, then exactly that commit is downloaded
(huggingface_hub: resumable, sizes checked, atomic per file). Failures are one :class:`HubError` line
naming the repository and the fix. Torch-free; huggingface_hub is imported only when a fetch runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from modelbake.errors import ModelbakeError


class HubError(ModelbakeError):
    """A repository or revision that does not exist, or a download that failed."""


def fetch_snapshot(repo: str, revision: str | None, dest: Path, *, name: str, example: str = "") -> str:
    """Download ``repo`` at ``revision`` into ``dest``; returns the commit downloaded. ``name`` starts each
    error line (the user's spec), ``example`` suggests a repository that exists."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        commit = HfApi().model_info(repo, revision=revision).sha
        snapshot_download(repo, revision=commit, local_dir=dest)
    except RevisionNotFoundError as exc:
        raise HubError(f"{name}: revision {revision!r} does not exist in {repo}; give a branch, tag or commit") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(
            f"{name}: no repository {repo!r} on the hub (a private or gated one needs the build secret hf_token); "
            f"check the name" + (f", e.g. {example}" if example else "")
        ) from exc
    except Exception as exc:
        # Transport errors (httpx's, which huggingface_hub uses), HTTP errors and its size checks (OSError).
        if not isinstance(exc, OSError | ConnectionError) and not type(exc).__module__.startswith(
            ("httpx", "huggingface_hub")
        ):
            raise
        raise HubError(
            f"{name}: download failed ({type(exc).__name__}: {exc}); check the network or proxy and try again "
            "(huggingface_hub resumes), or use a local copy (NAME@dir:PATH)"
        ) from exc
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping, not the model's
    return commit
