"""vicuna.files: atomic writes — also on a really full and a really read-only file system — and clean-up on signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, run_cli

from vicuna import files
from vicuna.errors import OutputError
from vicuna.files import (
    RecordWriter, Terminated, atomic_open, raise_on_sigterm, write_bytes, write_json, write_records, write_text,
)

RECORD = {"id": "a", "conversations": [{"from": "human", "value": "hi " * 40}, {"from": "gpt", "value": "ho " * 40}]}


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real 256 KiB tmpfs; yields (folder, remount_read_only). Needs root; skipped otherwise."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")

    def read_only():
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)

    yield mnt, read_only
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_success_replaces_the_file_with_normal_permissions(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓" and leftovers(tmp_path) == ["out.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # what open() would give, not mkstemp's 0600
    write_bytes(tmp_path / "secret", b"k", permissions=0o600)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    write_json(tmp_path / "d.json", {"ü": [1, 2]})
    assert json.loads((tmp_path / "d.json").read_text(encoding="utf-8")) == {"ü": [1, 2]}


@pytest.mark.parametrize("crash", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, crash):
    target = tmp_path / "out.jsonl"
    target.write_text("precious\n")
    with pytest.raises(crash):
        with atomic_open(target) as f:
            f.write("half")
            raise crash()
    with pytest.raises(crash):
        with RecordWriter(target, force=True) as w:
            w.write(RECORD)
            raise crash()
    assert target.read_text() == "precious\n" and leftovers(tmp_path) == ["out.jsonl"]


def test_replace_false_never_replaces(tmp_path):
    """What two processes racing to create the same file (the arena's salt) rely on: one wins, whole."""
    target = tmp_path / "salt"
    write_text(target, "first", permissions=0o600, replace=False)
    with pytest.raises(FileExistsError):
        write_text(target, "second", replace=False)
    assert target.read_text() == "first" and leftovers(tmp_path) == ["salt"]


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmpfs):
    """Issue 19 #9 on a real full file system: no traceback, no partial or temporary file."""
    fs, _ = tmpfs
    (fs / "kept.json").write_text("[]")
    with pytest.raises(OutputError, match=r"disk full writing .*big\.bin") as e:
        write_bytes(fs / "big.bin", b"x" * (1 << 20))
    assert e.value.exit_code == 1
    with pytest.raises(OutputError, match="disk full"):
        write_records(fs / "kept.json", (RECORD for _ in range(10_000)), force=True)
    assert leftovers(fs) == ["kept.json"] and (fs / "kept.json").read_text() == "[]"


def test_full_disk_from_the_command_line(tmpfs, tmp_path):
    fs, _ = tmpfs
    src = tmp_path / "in.jsonl"
    src.write_text((json.dumps(RECORD) + "\n") * 5000)  # 1.6 MB: more than the file system holds
    p = run_cli("data", "merge", src, "-o", fs / "out.jsonl")
    assert p.returncode == 1, p.stderr
    assert f"error: disk full writing {fs / 'out.jsonl'}" in p.stderr and "Traceback" not in p.stderr
    assert leftovers(fs) == []


def test_read_only_output_is_a_clear_error(tmpfs, tmp_path):
    """Issue 19 #15: `-o` into a read-only place used to end in a raw EROFS traceback."""
    fs, read_only = tmpfs
    read_only()
    src = tmp_path / "in.json"
    src.write_text(json.dumps([RECORD]))
    p = run_cli("data", "merge", src, "-o", fs / "out.json")
    assert p.returncode == 2, p.stderr
    assert "error: read-only file system: cannot write" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(OutputError, match="read-only file system") as e:
        write_text(fs / "x.txt", "x")
    assert e.value.exit_code == 2


@pytest.mark.parametrize("command,sig,code", [
    (["data", "merge"], signal.SIGTERM, 143),
    (["data", "merge"], signal.SIGINT, 130),
    (["data", "clean", "--workers", "2", "--min-chars", "1"], signal.SIGTERM, 143),
])
def test_a_signal_mid_write_removes_the_temporary_file(tmp_path, command, sig, code):
    """Issue 19 #17: SIGTERM used to leave the hidden temporary output behind (Ctrl-C did not)."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(dict(RECORD, id=str(i))) + "\n" for i in range(150_000)))  # ~40 MB
    out = tmp_path / "out" / "big.jsonl"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "vicuna", *command, str(src), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 120
    while not leftovers(out.parent):  # the temporary file exists: the command is writing
        assert proc.poll() is None and time.monotonic() < deadline, "the command ended before it was signalled"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)  # also times out while an orphaned worker holds stderr open
    assert proc.returncode == code, err
    assert leftovers(out.parent) == [] and "Traceback" not in err
    time.sleep(0.2)  # the kernel's parent-death kill of pool workers is asynchronous
    assert not processes_mentioning(str(out)), "pool workers outlived the command"


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (Linux /proc; none elsewhere)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if text in cmdline and "zombie" not in state:
            found.append(int(d.name))
    return found


def test_only_the_first_sigterm_is_caught():
    """The first SIGTERM raises (clean-up runs); should that hang, a second one kills as usual."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs before this returns
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert files.terminated()
    finally:
        signal.signal(signal.SIGTERM, before)
        files._terminated.clear()  # else every later atomic write in this pytest process refuses to commit
