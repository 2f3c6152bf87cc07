"""Publishing a trained model folder to the Hugging Face Hub."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

# Never uploaded: pickles (weights travel as safetensors) and underscore-prefixed scratch files.
ALWAYS_IGNORED = ["*.bin", "*.pt", "*.pth", "*.pkl", "_*", ".*"]
CHECKPOINT_PATTERNS = ["checkpoint-*", "checkpoint-*/*"]
LOG_PATTERNS = ["runs", "runs/*", "trainer_state.json"]
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md")


class PublishError(OSError):
    """The folder cannot be published, or the Hub cannot be reached; the message says what to do."""


def ignore_patterns(include_checkpoints: bool = False, include_logs: bool = False) -> list[str]:
    """What an upload leaves out: checkpoints and logs unless asked for, pickles always."""
    patterns = list(ALWAYS_IGNORED)
    if not include_checkpoints:
        patterns += CHECKPOINT_PATTERNS
    if not include_logs:
        patterns += LOG_PATTERNS
    return patterns


def files_to_upload(folder: str | Path, include_checkpoints: bool = False, include_logs: bool = False) -> list[str]:
    """The paths (relative to `folder`) that a push uploads."""
    folder = Path(folder)
    patterns = ignore_patterns(include_checkpoints, include_logs)
    paths = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in paths if not any(fnmatch(p, pattern) for pattern in patterns))


def check_hub_ready(folder: str | Path) -> None:
    """Raises `PublishError` unless `folder` holds a complete, loadable model: weights, code, tokenizer, card."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder}: no such folder.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors")
    if missing:
        raise PublishError(f"{folder} is not a complete model folder: missing {', '.join(missing)}.")
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
    code_files = {reference.split(".")[0] + ".py" for reference in auto_map.values()}
    missing_code = sorted(name for name in code_files if not (folder / name).is_file())
    if not auto_map or missing_code:
        raise PublishError(
            f"{folder}: config.json must name the model's code in auto_map and the code files must be there "
            f"(missing: {', '.join(missing_code) or 'auto_map'}); save the model with lm_lstm imported."
        )


def _is_network_error(error: Exception) -> bool:
    """Connection failures raised by the HTTP client under `huggingface_hub` (httpx, or httpx2 in newer releases)."""
    return isinstance(error, ConnectionError) or type(error).__module__.split(".")[0] in ("httpx", "httpx2")


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload LSTM language model (lm-lstm)",
    include_checkpoints: bool = False,
    include_logs: bool = False,
) -> str:
    """Uploads a model folder to the Hub repository `repo_id` (created if needed); returns the commit URL."""
    check_hub_ready(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=ignore_patterns(include_checkpoints, include_logs),
        )
    except OfflineModeIsEnabled:
        raise PublishError(
            "cannot push: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1); unset it and check the network."
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PublishError(
                f"the Hub refused the upload to {repo_id} (HTTP {status}): log in with `hf auth login` or set HF_TOKEN "
                "to a token with write access."
            ) from None
        raise PublishError(f"the Hub refused the upload to {repo_id}: {str(error).splitlines()[0]}") from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise PublishError(
            f"cannot reach the Hub ({type(error).__name__}): check the network, or HF_ENDPOINT if you set it."
        ) from None
    return commit.commit_url
