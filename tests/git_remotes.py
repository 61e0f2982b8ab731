"""Git remotes for the projects tests: bare repositories on disk with a main branch, and someone else's pushes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git(*args: str, cwd: Path | None = None, check: bool = True) -> str:
    """Plain git for the test's own side (the remote, the seed clone), with no host config."""
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "Seed", "GIT_AUTHOR_EMAIL": "seed@example.com",
           "GIT_COMMITTER_NAME": "Seed", "GIT_COMMITTER_EMAIL": "seed@example.com"}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"git {args}: {done.stderr}")
    return done.stdout.strip()


def make_remote(root: Path, name: str) -> Path:
    """A bare repository with a main branch of two files, as a team's remote would be."""
    remote = root / "remotes" / f"{name}.git"
    git("init", "-q", "--bare", "-b", "main", str(remote))
    seed = root / "seeds" / name
    git("init", "-q", "-b", "main", str(seed))
    (seed / "README.md").write_text("hello\n")
    (seed / "src").mkdir()
    (seed / "src" / "app.py").write_text("print('v1')\n")
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", "first", cwd=seed)
    git("push", "-q", str(remote), "main", cwd=seed)
    return remote


def advance_remote(root: Path, name: str, text: str) -> str:
    """A new commit on the remote's main (someone else pushed); its id."""
    seed = root / "seeds" / name
    (seed / "CHANGELOG").write_text(text)
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", f"upstream {text}", cwd=seed)
    git("push", "-q", str(root / "remotes" / f"{name}.git"), "main", cwd=seed)
    return git("rev-parse", "HEAD", cwd=seed)
