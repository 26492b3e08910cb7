"""pretrain/files.py: the one atomic write. The content arrives, a failed write leaves the old file and no temporary
file, the mode follows the umask, two writers never share a temporary name, and the file and its folder are
fsynced. In-process, on tmp_path."""

from __future__ import annotations

import os
import stat

import pytest

from pretrain import files
from pretrain.files import atomic_folder, atomic_write, atomic_writer, publish_folder


class WriterFailed(Exception):
    pass


def names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test and put the process's back afterwards."""
    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


def test_writes_text_and_bytes(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo\n")
    atomic_write(str(tmp_path / "b.bin"), b"\x00\xff")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode("utf-8")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    atomic_write(tmp_path / "a.txt", "replaced")
    assert (tmp_path / "a.txt").read_text() == "replaced"
    assert names(tmp_path) == ["a.txt", "b.bin"]


def test_streaming_writer_in_text_and_binary(tmp_path):
    with atomic_writer(tmp_path / "s.jsonl", "w") as f:
        f.write("{}\n")
        f.write("[]\n")
    with atomic_writer(tmp_path / "s.bin") as f:
        f.write(b"ab")
    assert (tmp_path / "s.jsonl").read_text() == "{}\n[]\n"
    assert (tmp_path / "s.bin").read_bytes() == b"ab"
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_writer(tmp_path / "x", "a"):
            pass


@pytest.mark.parametrize("failure", [WriterFailed, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, failure):
    target = tmp_path / "config.yaml"
    target.write_text("old\n")
    with pytest.raises(failure):
        with atomic_writer(target, "w") as f:
            f.write("half of the new")
            assert len(names(tmp_path)) == 2  # the temporary sibling, while writing
            raise failure()
    assert target.read_text() == "old\n"
    assert names(tmp_path) == ["config.yaml"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(WriterFailed):
        with atomic_writer(tmp_path / "new.json"):
            raise WriterFailed()
    assert names(tmp_path) == []


def test_a_failed_replace_removes_the_temp_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", refuse)
    (tmp_path / "latest").write_text("step_00000001\n")
    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "latest", "step_00000002\n")
    assert names(tmp_path) == ["latest"] and (tmp_path / "latest").read_text() == "step_00000001\n"


@pytest.mark.parametrize("value,file_mode,folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                         (0o002, 0o664, 0o775)])
def test_modes_follow_the_umask_as_open_and_mkdir_would(tmp_path, umask, value, file_mode, folder_mode):
    umask(value)
    atomic_write(tmp_path / "f.json", "{}")
    with atomic_folder(tmp_path / "report") as tmp:
        atomic_write(os.path.join(tmp, "inner.txt"), "x")
    with open(tmp_path / "plain", "w"):
        pass
    assert mode(tmp_path / "f.json") == mode(tmp_path / "plain") == file_mode
    assert mode(tmp_path / "report" / "inner.txt") == file_mode
    assert mode(tmp_path / "report") == folder_mode


def test_two_writers_get_distinct_temp_files(tmp_path):
    target = tmp_path / "sweep.json"
    with atomic_writer(target, "w") as first, atomic_writer(target, "w") as second:
        temps = names(tmp_path)  # two distinct siblings of the target (same folder: a rename, not a copy)
        assert len(temps) == 2 and all(t.startswith(".sweep.json.") and t.endswith(".tmp") for t in temps)
        first.write("first")
        second.write("second")
    assert target.read_text() == "first"  # the last to finish (the outer block) wins, whole
    assert names(tmp_path) == ["sweep.json"]


def test_a_taken_temp_name_is_skipped(tmp_path, monkeypatch):
    tokens = iter(["aaaa", "aaaa", "bbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(tokens))
    fd1, tmp1 = files._create_temp_file(str(tmp_path), "x")
    fd2, tmp2 = files._create_temp_file(str(tmp_path), "x")
    os.close(fd1), os.close(fd2)
    assert (os.path.basename(tmp1), os.path.basename(tmp2)) == (".x.aaaa.tmp", ".x.bbbb.tmp")


def record_fsyncs(monkeypatch) -> list[str]:
    """Paths of the file descriptors passed to os.fsync (the real fsync still runs)."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names file descriptors through /proc")
def test_the_file_then_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = record_fsyncs(monkeypatch)
    atomic_write(tmp_path / "trainer_state.json", "{}")
    assert len(synced) == 2
    assert os.path.dirname(synced[0]) == str(tmp_path) and synced[0].endswith(".tmp")  # the data, before the rename
    assert synced[1] == str(tmp_path)  # the rename


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names file descriptors through /proc")
def test_a_published_folder_is_fsynced_inside_and_in_its_parent(tmp_path, monkeypatch):
    with atomic_folder(tmp_path / "out") as tmp:
        os.mkdir(os.path.join(tmp, "sub"))
        for name in ("a.json", os.path.join("sub", "b.png")):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
        synced = record_fsyncs(monkeypatch)
    assert {os.path.relpath(p, tmp) for p in synced[:-1]} == {"a.json", ".", "sub", os.path.join("sub", "b.png")}
    assert synced[-1] == str(tmp_path)
    assert names(tmp_path) == ["out"] and names(tmp_path / "out") == ["a.json", "sub"]


def test_a_folder_write_is_all_or_nothing(tmp_path):
    with pytest.raises(WriterFailed):
        with atomic_folder(tmp_path / "analysis") as tmp:
            atomic_write(os.path.join(tmp, "logit_lens.json"), "{}")
            raise WriterFailed()
    assert names(tmp_path) == []


def test_a_folder_is_not_published_over_another(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "theirs.txt").write_text("theirs")
    with pytest.raises(FileExistsError):
        with atomic_folder(tmp_path / "out") as tmp:
            atomic_write(os.path.join(tmp, "ours.txt"), "ours")
    assert names(tmp_path) == ["out"] and names(tmp_path / "out") == ["theirs.txt"]
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty") as tmp:  # an empty folder made beforehand is taken
        atomic_write(os.path.join(tmp, "ours.txt"), "ours")
    assert names(tmp_path / "empty") == ["ours.txt"]


def test_replace_swaps_an_earlier_folder_and_keeps_it_when_the_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "report"
    out.mkdir()
    (out / "REPORT.md").write_text("old")
    with atomic_folder(out, replace=True) as tmp:
        atomic_write(os.path.join(tmp, "REPORT.md"), "new")
    assert (out / "REPORT.md").read_text() == "new" and names(tmp_path) == ["report"]

    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".report.tmp-"):
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        with atomic_folder(out, replace=True) as tmp:
            atomic_write(os.path.join(tmp, "REPORT.md"), "newer")
    assert (out / "REPORT.md").read_text() == "new" and names(tmp_path) == ["report"]


def test_publish_folder_moves_a_folder_built_elsewhere(tmp_path):
    partial = tmp_path / ".ln_free.partial"
    partial.mkdir()
    (partial / "config.yaml").write_text("new")
    (tmp_path / "ln_free").mkdir()
    (tmp_path / "ln_free" / "config.yaml").write_text("old")
    publish_folder(partial, tmp_path / "ln_free", replace=True)
    assert names(tmp_path) == ["ln_free"] and (tmp_path / "ln_free" / "config.yaml").read_text() == "new"
