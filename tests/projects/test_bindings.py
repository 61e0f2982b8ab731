"""A conversation's binding: kept beside its workspace, read back after a restart, and where its runs start."""

from __future__ import annotations

import os

from codebuddy.sandbox import Bubblewrap, ConversationDirs, NoSandbox, RunPlace, Workspaces, start_dir
from projects.bindings import Bindings, Checkout, ConversationProjects, short_id


def test_the_binding_lives_beside_the_workspace_and_survives_a_new_reader(tmp_path):
    bindings = Bindings(Workspaces(str(tmp_path)))
    state = ConversationProjects(current="demo", bound_by="olga",
                                 checkouts={"demo": Checkout(branch="main", base="a" * 40)})
    bindings.write("cid+/=", state)
    again = Bindings(Workspaces(str(tmp_path))).read("cid+/=")
    assert again == state
    base = Workspaces(str(tmp_path)).base_for("cid+/=")
    assert os.listdir(os.path.join(base, "project")) == ["binding.json"]  # no temporary file left
    assert not os.path.relpath(bindings.directory("cid+/="), base).startswith("workspace")  # outside the jail
    place = bindings.place_for("cid+/=")
    assert place.subdir == "demo" and "git checkout of the project demo (branch main)" in place.note
    (tmp_path / "conversations" / os.path.basename(base) / "project" / "binding.json").write_text("{not json")
    assert bindings.read("cid+/=") == ConversationProjects() and bindings.place_for("cid+/=") == RunPlace()
    assert len(short_id("cid+/=")) == 8 and short_id("cid+/=") != short_id("cid+/==")


def test_a_run_starts_in_the_checkout_only_when_it_is_a_real_directory(tmp_path):
    (tmp_path / "demo").mkdir()
    os.symlink("/etc", tmp_path / "linked")
    assert start_dir(str(tmp_path), "demo") == "demo"
    for name in ("linked", "missing", "../demo", "a/b", "..", ""):
        assert start_dir(str(tmp_path), name) == ""
    dirs = ConversationDirs(str(tmp_path), str(tmp_path))
    argv, cwd = Bubblewrap("true", bwrap="bwrap").command(["true"], dirs, subdir="demo")
    assert argv[argv.index("--chdir") + 1] == "/workspace/demo" and cwd == str(tmp_path)
    argv, _ = Bubblewrap("true", bwrap="bwrap").command(["true"], dirs, subdir="../etc")
    assert argv[argv.index("--chdir") + 1] == "/workspace"
    assert NoSandbox().command(["true"], dirs, subdir="demo")[1] == str(tmp_path / "demo")
