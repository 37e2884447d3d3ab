"""clients.supernode: the SuperNode starts only with a trusted-entities file that guards it."""

from __future__ import annotations

import sys

import pytest

from clients.supernode import main, private_key_problem, trusted_entities_problem


def public_key_line() -> str:
    """A real OpenSSH Ed25519 public key line (Flower loads each trusted key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " coordinator"


@pytest.mark.parametrize("text, problem", [
    ("{}\n", "names no key"),
    ("# only a comment\n", "names no key"),
    ("- a list\n", "names no key"),
    ("coordinator: 3\n", "must map a key id to an OpenSSH public key line"),
    ("coordinator: [unclosed\n", "cannot read the trusted-entities YAML (ParserError)"),
    # Flower loads these after it started: "Invalid data" ended in a traceback (found by an audit)
    ('coordinator: "ssh-ed25519 AAAA"\n', "trusted entity 'coordinator' is not an OpenSSH Ed25519 public key line"),
    ("coordinator: ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBA== x\n",
     "trusted entity 'coordinator' is not an OpenSSH Ed25519 public key line"),
])
def test_a_trusted_entities_file_that_would_let_every_app_run_is_refused(tmp_path, capsys, text, problem):
    """Flower checks apps only when the mapping it reads is non-empty: an empty file would
    switch the check off. The launcher refuses it in one line, before Flower starts."""
    yaml_file = tmp_path / "trusted-entities.yaml"
    yaml_file.write_text(text)
    assert problem in trusted_entities_problem(["--insecure", "--trusted-entities", str(yaml_file)])
    assert main([f"--trusted-entities={yaml_file}"]) == 2
    # the last line: another test in the same process may have left logging at INFO (alembic's lines)
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"clients.supernode: error: {yaml_file}: ") and problem in err


def test_a_key_line_with_spaces_around_it_is_one_line_not_flowers_traceback(tmp_path, capsys):
    """fedmoco's check stripped the value, Flower reads it as it is: ' ssh-ed25519 ...' passed,
    then Flower ended in ValueError: Invalid line format (found by an audit)."""
    yaml_file = tmp_path / "trusted-entities.yaml"
    yaml_file.write_text(f'coordinator: " {public_key_line()}"\n')
    assert main([f"--trusted-entities={yaml_file}"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"clients.supernode: error: {yaml_file}: trusted entity 'coordinator' has spaces or line breaks "
                   "around its key line; remove them (the value must be exactly 'ssh-ed25519 AAAA...')")


def test_keygens_printed_line_is_a_trusted_entity_whatever_the_name(tmp_path, capsys):
    """A name YAML reads as a number or a boolean (2026, yes) was printed unquoted, and the
    SuperNode refused the very line keygen told the site to paste (found by an audit)."""
    from fedmoco.cli import main as fedmoco

    for name in ("2026", "yes", "coordinator"):
        assert fedmoco(["keygen", "--type", "ed25519", "--out", str(tmp_path / name), "--name", name]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        yaml_file = tmp_path / f"{name}.yaml"
        yaml_file.write_text(line + "\n")
        assert trusted_entities_problem(["--trusted-entities", str(yaml_file)]) is None, line


def test_a_file_naming_a_key_passes_the_launchers_check(tmp_path):
    yaml_file = tmp_path / "trusted-entities.yaml"
    yaml_file.write_text(f"coordinator: {public_key_line()}\n")
    assert trusted_entities_problem(["--trusted-entities", str(yaml_file)]) is None


def test_the_supernode_and_its_client_apps_reach_each_other_past_a_web_proxy(tmp_path, monkeypatch):
    """A SuperNode talks to each ClientApp it starts over 127.0.0.1 (gRPC); behind a site's web
    proxy every round failed with UNAVAILABLE (tests/fedmoco/test_network.py shows why). The
    launcher exempts loopback before Flower starts, and keeps the proxy for the SuperLink."""
    import importlib
    import os

    # the module, not the function of the same name that flwr.supernode.cli exports
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")

    seen = {}
    monkeypatch.setattr(cli, "flower_supernode", lambda: seen.update(os.environ))
    monkeypatch.setattr("sys.argv", ["clients.supernode"])
    monkeypatch.setenv("https_proxy", "http://proxy.hospital:3128")
    monkeypatch.setenv("no_proxy", "pacs.local")
    monkeypatch.delenv("NO_PROXY", raising=False)  # so that the launcher's NO_PROXY is undone after the test
    yaml_file = tmp_path / "trusted-entities.yaml"
    yaml_file.write_text(f"coordinator: {public_key_line()}\n")
    assert main(["--trusted-entities", str(yaml_file), "--host", "127.0.0.2"]) == 0
    assert seen["no_proxy"] == "pacs.local,127.0.0.1,localhost,::1,127.0.0.2"  # and its own --host
    assert seen["https_proxy"] == "http://proxy.hospital:3128"


def test_app_signed_after_is_the_sites_and_refuses_older_signed_apps(tmp_path, monkeypatch, capsys):
    """``--app-signed-after`` is taken out before Flower parses the options, and the check the
    launcher installs refuses an app signed before it: a SuperLink replaying an older version
    the coordinator once signed gets Flower's "could not be verified" reply."""
    import importlib
    import json
    from types import SimpleNamespace

    from fedmoco.appsign import SIGNATURE_FILE, build_fab, sign_app
    from fedmoco.keys import keygen

    app = tmp_path / "app"
    (app / "tinyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\ndependencies = []\n\n[tool.flwr.app]\npublisher = "x"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tinyapp.s:app"\nclientapp = "tinyapp.c:app"\n')
    for name in ("__init__", "s", "c"):
        (app / "tinyapp" / f"{name}.py").write_text("app = None\n")
    public, _ = keygen(tmp_path / "keys", "coordinator", "ed25519")
    sign_app(app, tmp_path / "keys" / "coordinator", "coordinator")
    signed_at = json.loads((app / SIGNATURE_FILE).read_text())["coordinator"]["signed_at"]
    fab = SimpleNamespace(content=build_fab(app), hash_str="ab" * 32)
    trusted = {"coordinator": public.read_text().strip()}
    yaml_file = tmp_path / "trusted-entities.yaml"
    yaml_file.write_text(f'coordinator: "{trusted["coordinator"]}"\n')

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    sci = importlib.import_module("flwr.supernode.start_client_internal")
    seen = {}
    monkeypatch.setattr(cli, "flower_supernode", lambda: seen.update(argv=list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["clients.supernode"])
    monkeypatch.setattr(sci, "_verify_fab", sci._verify_fab)  # undone after the test

    assert main(["--insecure", "--app-signed-after", "not-a-date", "--trusted-entities", str(yaml_file)]) == 2
    err = capsys.readouterr().err
    assert err == ("clients.supernode: error: --app-signed-after 'not-a-date': not a date (2026-11-29, "
                   "2026-11-29T14:00:00Z) nor unix seconds\n")

    assert main(["--insecure", f"--app-signed-after={signed_at + 1}", "--trusted-entities", str(yaml_file)]) == 0
    assert seen["argv"] == ["flower-supernode", "--insecure", "--trusted-entities", str(yaml_file)]
    assert sci._verify_fab(fab, trusted) is False
    assert "before this site's --app-signed-after" in capsys.readouterr().err

    assert main(["--insecure", "--app-signed-after", str(signed_at), "--trusted-entities", str(yaml_file)]) == 0
    assert sci._verify_fab(fab, trusted) is True


@pytest.mark.parametrize("extra, problem", [
    # Flower's parser takes the abbreviation, and the last value wins: an empty file replaced the checked one
    (["--trusted-ent", "{empty}"], "{empty}: the trusted-entities YAML names no key"),
    (["--superlink", "superlink.example.org:9092", "--insecure"],
     "--insecure to the SuperLink at superlink.example.org:9092: a site's connection must be TLS"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0: the SuperNode's Runtime API has no authentication"),
])
def test_options_that_would_expose_the_supernode_are_refused_as_flower_reads_them(tmp_path, capsys, monkeypatch,
                                                                                  extra, problem):
    import importlib

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    monkeypatch.setattr(cli, "flower_supernode", lambda: pytest.fail("Flower started"))
    good, empty = tmp_path / "trusted-entities.yaml", tmp_path / "empty.yaml"
    good.write_text(f"coordinator: {public_key_line()}\n")
    empty.write_text("{}\n")
    argv = ["--trusted-entities", str(good), *[a.format(empty=empty) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clients.supernode: error: " + problem.format(empty=empty)) and err.count("\n") == 1


def test_a_supernode_may_go_without_tls_to_a_superlink_on_its_own_machine(tmp_path, monkeypatch):
    import importlib

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    started = []
    monkeypatch.setattr(cli, "flower_supernode", lambda: started.append(True))
    monkeypatch.setattr("sys.argv", ["clients.supernode"])
    good = tmp_path / "trusted-entities.yaml"
    good.write_text(f"coordinator: {public_key_line()}\n")
    assert main(["--trusted-entities", str(good), "--superlink", "127.0.0.1:9092", "--insecure"]) == 0 and started


def test_a_private_key_that_cannot_authenticate_is_refused_before_flower_starts(tmp_path, capsys):
    """A missing --auth-supernode-private-key ended in a FileNotFoundError traceback after
    "Starting Flower SuperNode" (found by an audit); a key fedmoco keygen made passes."""
    from fedmoco.cli import main as fedmoco

    assert fedmoco(["-q", "keygen", "--out", str(tmp_path / "keys"), "--name", "site"]) == 0
    assert private_key_problem(["--auth-supernode-private-key", str(tmp_path / "keys" / "site")]) is None
    yaml_file = tmp_path / "trusted-entities.yaml"
    yaml_file.write_text(f"coordinator: {public_key_line()}\n")
    for given, problem in [(tmp_path / "nope", "cannot be read (No such file or directory)"),
                           (tmp_path / "keys" / "site.pub", "not an unencrypted OpenSSH elliptic-curve private key")]:
        capsys.readouterr()
        assert main(["--trusted-entities", str(yaml_file), "--superlink", "127.0.0.1:1", "--insecure",
                     "--auth-supernode-private-key", str(given)]) == 2
        err = capsys.readouterr().err
        assert err == f"clients.supernode: error: --auth-supernode-private-key {given}: {problem}" + (
            " (fedmoco keygen writes one)\n" if "elliptic" in problem else "\n"), err
