"""`diffclip eval --dataset NAME` never touches the network without `--download`: for every name the CLI
accepts, an empty or missing --data-root is a one-line error, exit 2, before the model loads, with sockets and
subprocesses blocked (any attempt is recorded and fails the test)."""

import socket
import subprocess

import pytest

from diffclip import dataset_files
from diffclip.cli import main

pytest.importorskip("clip_benchmark", reason="the CLIP Benchmark route needs pip install -e '.[eval]'")


@pytest.fixture
def network_attempts(monkeypatch):
    attempts = []

    def record(what):
        def blocked(*args, **kwargs):
            attempts.append((what, args[:2]))
            raise OSError(f"test: network blocked ({what})")
        return blocked

    for obj, attr in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                      (socket, "getaddrinfo"), (subprocess, "Popen")):
        monkeypatch.setattr(obj, attr, record(f"{getattr(obj, '__name__', obj)}.{attr}"))
    return attempts


def _task(name):
    return "retrieval" if dataset_files.default_task(name) == "zeroshot_retrieval" else "zeroshot"


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_every_accepted_dataset_is_checked_offline_before_the_model_loads(tmp_path, capsys, network_attempts,
                                                                          where):
    for name in dataset_files.accepted_names() + ["wds/tiny"]:
        root = tmp_path / where / name.replace("/", "_")
        if where == "empty":
            root.mkdir(parents=True)
        # A checkpoint that does not exist: an error about it would mean the dataset was not checked first.
        code = main(["eval", _task(name), "--dataset", name, "--data-root", str(root),
                     "--checkpoint", str(tmp_path / "no.pt")])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2, (name, err)
        assert network_attempts == [], (name, network_attempts)
        assert err and err[-1].startswith("diffclip: error:") and "no.pt" not in err[-1], (name, err)
        assert "tried to reach the network" not in err[-1], (name, err)  # caught by the check, not the guard
        assert "Traceback" not in "\n".join(err), name
        # no file fetched into the root (torchvision may make empty sub-folders), a missing root not created
        assert [p for p in root.rglob("*") if p.is_file()] == [] if where == "empty" else not root.exists(), name


def test_url_root_needs_download(tmp_path, capsys, network_attempts):
    assert main(["eval", "zeroshot", "--dataset", "wds/x", "--data-root", "https://example.org/wds",
                 "--checkpoint", str(tmp_path / "no.pt")]) == 2
    assert "is a URL" in capsys.readouterr().err and network_attempts == []


def test_unknown_name_is_refused_with_the_closest_names_and_no_misleading_hint(tmp_path, capsys):
    for task in ("zeroshot", "retrieval"):
        assert main(["eval", task, "--dataset", "cifar_10", "--data-root", str(tmp_path),
                     "--checkpoint", str(tmp_path / "no.pt")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unknown --dataset 'cifar_10': did you mean cifar10" in err[0], err
        assert "--download" not in err[0] and "zeroshot_classification dataset" not in err[0], err


def test_the_guard_blocks_sockets_and_the_builders_shell_commands():
    from clip_benchmark.datasets import builder

    with dataset_files.no_network("x"):
        with pytest.raises(dataset_files.NetworkBlocked, match="pass --download"):
            socket.create_connection(("127.0.0.1", 9))
        with pytest.raises(dataset_files.NetworkBlocked):
            builder.call("wget http://example.org", shell=True)
    assert socket.create_connection is not None and builder.call.__name__ == "call"
