"""The one atomic writer (hdnas.safeio.write_atomic) and a command's OutputDir: whole files,
no planted temp paths, links replaced not followed, no-clobber, nothing outside the root."""
import os
import stat

import pytest

from hdnas.io.atomic import OutputDir, OutputExistsError, UnsafeWriteError, write_atomic
from hdnas.safeio import JSONFileError, check_plain_name, plain_name, read_json


def test_writes_whole_files_with_plain_permissions(tmp_path):
    p = write_atomic(tmp_path / "a" / "x.bin", b"abc")
    assert p.read_bytes() == b"abc"
    write_atomic(p, lambda f: f.write(b"def"))
    assert p.read_bytes() == b"def"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    assert [q.name for q in p.parent.iterdir()] == ["x.bin"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    p = write_atomic(tmp_path / "x", "old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(p, boom)
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["x"]


def test_links_are_replaced_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.json").symlink_to(victim)
    (out / "x.json.tmp").symlink_to(victim)  # the old predictable temp name
    with pytest.raises(OutputExistsError):
        write_atomic(out / "x.json", "new", overwrite=False)
    write_atomic(out / "x.json", "new")
    assert victim.read_text() == "precious"
    assert not (out / "x.json").is_symlink() and (out / "x.json").read_text() == "new"
    assert (out / "x.json.tmp").is_symlink()


def test_root_refuses_a_folder_link_leading_out(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    with pytest.raises(UnsafeWriteError, match="outside the output folder"):
        write_atomic(out / "sub" / "deep" / "x", b"1", root=out)
    assert not any(elsewhere.iterdir())  # not even a folder was made
    with pytest.raises(UnsafeWriteError, match="outside"):
        write_atomic(out / ".." / "x", b"1", root=out)


def test_output_dir_never_replaces_an_input(tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(b"input")
    (tmp_path / "link.png").symlink_to(src)
    out = OutputDir(tmp_path, overwrite=True, inputs=[src])
    for p in (src, tmp_path / "link.png"):
        with pytest.raises(UnsafeWriteError, match="never replaces an input"):
            out.write(p, b"x")
    assert src.read_bytes() == b"input"
    with pytest.raises(OutputExistsError, match="a.txt already exists.*b.txt already exists"):
        (tmp_path / "a.txt").write_text("1"), (tmp_path / "b.txt").write_text("2")
        OutputDir(tmp_path).claim_all([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c"])


@pytest.mark.parametrize("name, plain", [("../../x", "x"), ("/etc/passwd", "etc_passwd"),
                                         ("..", "model"), ("", "model"), ("tiny18", "tiny18"),
                                         ("a b/c", "a_b_c"), ("x" * 300, "x" * 100)])
def test_plain_names(name, plain):
    assert plain_name(name) == plain
    if name != plain:
        with pytest.raises(UnsafeWriteError, match="not a plain file name"):
            check_plain_name(name)


@pytest.mark.parametrize("data, match", [
    (b"\xff\xfe", "not UTF-8"), (b"[" * 100_000, "nested too deeply"), (b'{"a": NaN}', "NaN"),
    (b'{"a": -Infinity}', "-Infinity"), (b"[1e400]", "overflows"), (b"{", "not valid JSON"),
    (b"1" * 5000, "usable"), (b"{}\x00", "NUL")])
def test_read_json_refuses_naming_the_file(tmp_path, data, match):
    p = tmp_path / "f.json"
    p.write_bytes(data)
    with pytest.raises(JSONFileError, match=match) as e:
        read_json(p)
    assert str(p) in str(e.value)
    with pytest.raises(JSONFileError, match="larger than 10 bytes"):
        p.write_text("[" + "1," * 20 + "1]")
        read_json(p, max_bytes=10)
