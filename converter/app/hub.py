"""`--push-to-hub`: upload a converted folder with huggingface_hub (an optional dependency)."""

from __future__ import annotations

from pathlib import Path

from converter.errors import PublishError


def check_hub_ready() -> None:
    """Fail before any work when huggingface_hub is missing or the user is not logged in."""
    try:
        import huggingface_hub
    except ImportError:
        raise PublishError(
            "--push-to-hub needs huggingface_hub: pip install huggingface_hub, then huggingface-cli login"
        ) from None
    if not huggingface_hub.get_token():
        raise PublishError("--push-to-hub needs a Hugging Face token: run huggingface-cli login (or set HF_TOKEN)")


def push_folder(folder: Path, repo_id: str) -> str:
    """Create `repo_id` if needed and upload `folder` into it; return the repository URL."""
    check_hub_ready()
    import huggingface_hub

    try:
        huggingface_hub.create_repo(repo_id, repo_type="model", exist_ok=True)
        huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"Upload {Path(folder).name} converted by mobilenet-convert",
        )
    except Exception as error:  # network, auth, permissions: all the Hub's, reported as one line
        message = " ".join(str(error).split()) or type(error).__name__
        raise PublishError(f"cannot upload {folder} to {repo_id}: {message}") from None
    return f"https://huggingface.co/{repo_id}"
