"""The "open a merge request" link for a branch /push made, on GitHub, GitLab, Gitee and Gitea-style hosts."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from projects.catalog import Project


def forge_of(project: Project) -> str:
    """The kind of host the project lives on: its `forge`, else a guess from the host name ("" when unknown)."""
    if project.forge:
        return project.forge
    host = (urlsplit(project.url).hostname or "").lower() if project.scheme in ("https", "http") else ""
    if "github" in host:
        return "github"
    if "gitlab" in host:
        return "gitlab"
    if host == "gitee.com" or host.endswith(".gitee.com"):
        return "gitee"
    if any(word in host for word in ("gitea", "forgejo", "codeberg")):
        return "gitea"
    return ""


def merge_request_link(project: Project, branch: str, target: str) -> str:
    """Where to open a merge request of `branch` into `target` ("" for a host of unknown kind or a local remote)."""
    forge = forge_of(project)
    if not forge or project.scheme not in ("https", "http"):
        return ""
    parts = urlsplit(project.url)
    path = parts.path.rstrip("/").removesuffix(".git")
    base = f"{parts.scheme}://{parts.netloc}{path}"
    source, into = quote(branch, safe="/"), quote(target, safe="/")
    if forge == "gitlab":
        return (f"{base}/-/merge_requests/new?merge_request%5Bsource_branch%5D={source}"
                f"&merge_request%5Btarget_branch%5D={into}")
    if forge == "github":
        return f"{base}/compare/{into}...{source}?expand=1"
    return f"{base}/compare/{into}...{source}"  # Gitee and Gitea-style hosts
