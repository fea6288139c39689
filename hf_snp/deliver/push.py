"""Pushing a saved checkpoint to the Hugging Face Hub."""

from __future__ import annotations

import os


def push_folder(folder: str, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload a saved hf_snp checkpoint (weights, config, code files, tokenizer, report, model card).

    The model card is regenerated with the repository name unless the folder's README.md was
    written by someone else. Returns the URL of the upload commit.
    """
    from huggingface_hub import HfApi

    from .card import CARD_MARKER, model_card
    from .report import REPORT_NAME, PruneReport

    if not os.path.exists(os.path.join(folder, "config.json")) or not os.path.exists(os.path.join(folder, REPORT_NAME)):
        raise FileNotFoundError(f"{folder!r} is not a checkpoint saved by hf_snp "
                                f"(config.json and {REPORT_NAME} expected)")
    if "/" not in repo_id:
        raise ValueError(f"repo_id {repo_id!r} should look like 'user/name'")
    readme = os.path.join(folder, "README.md")
    if not os.path.exists(readme) or CARD_MARKER in open(readme, encoding="utf-8").read():
        with open(readme, "w", encoding="utf-8") as handle:
            handle.write(model_card(PruneReport.load(folder), repo_id))
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    report = PruneReport.load(folder)
    message = commit_message or (f"hf_snp: {report.get('method')} {report.get('sparsity', 0):.0%} of "
                                 f"{', '.join(report.get('targets', []))}")
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=message)
    return getattr(commit, "commit_url", str(commit))
