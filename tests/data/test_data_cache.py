"""The on-disk image cache: contents, keyed rebuilds, atomic creation, bad images, and patch
sampling that depends on the seed and the step only (not on workers, not on resuming)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hdnas.data import cache as cache_mod
from hdnas.data.benchmark import BenchmarkSet
from hdnas.data.cache import ImageCache, build, open_cache
from hdnas.io.images import ImageError
from hdnas.data.train import PatchSampler, batches


def _images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_cache_holds_exactly_the_decoded_images(tmp_path):
    _images(tmp_path / "hr", [(40, 36), (33, 50)])
    c = open_cache(tmp_path / "hr", 2, tmp_path / "c")
    ref = BenchmarkSet(tmp_path / "hr", 2)
    assert c.names == ["0", "1"] and len(c) == 2
    for i, item in enumerate(ref):
        assert np.array_equal(c.hr(i), item["hr"].permute(1, 2, 0).numpy())  # modcropped
        assert np.array_equal(c.lr(i), item["lr"].permute(1, 2, 0).numpy())  # MATLAB bicubic
    assert c.hr_size(1) == (32, 50) and c.lr_size(1) == (16, 25)
    assert isinstance(c._map()[0], np.memmap)
    assert c.nbytes() == sum(item["hr"].numel() + item["lr"].numel() for item in ref)


def test_cache_is_rebuilt_when_a_source_changes_and_the_old_one_removed(tmp_path):
    folder, root = tmp_path / "hr", tmp_path / "c"
    _images(folder, [(40, 40), (40, 40)])
    first = build(folder, 2, root)
    assert build(folder, 2, root) == first  # found, not rebuilt
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert build(folder, 2, root) == first and (first / "meta.json").stat().st_mtime_ns == stamp
    _images(folder, [(40, 40)], seed=1)  # 0.png rewritten: new content, size/mtime
    os.utime(folder / "0.png", ns=(1, 1))
    second = build(folder, 2, root)
    assert second != first and not first.exists()
    assert np.array_equal(ImageCache(second).hr(0), np.asarray(Image.open(folder / "0.png")))
    _images(folder / ".." / "hr", [(40, 40)] * 3)  # an image added
    third = build(folder, 2, root)
    assert third not in (first, second) and len(ImageCache(third)) == 3
    assert sorted(p.name for p in root.iterdir()) == [third.name]
    assert build(folder, 3, root) != third  # another scale, another cache


def test_a_killed_build_leaves_no_cache(tmp_path, monkeypatch):
    folder, root = tmp_path / "hr", tmp_path / "c"
    _images(folder, [(40, 40)] * 3)
    real = np.save

    def killed(*a, **k):  # dies after the pixels are written, before the index
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        build(folder, 2, root)
    assert list(root.iterdir()) == []  # no half cache, no temporary folder
    # a build killed by SIGKILL leaves its temporary folder: the next build removes it
    dead = root / f"{cache_mod.cache_path(folder, 2, root)[0].name}.tmp-{os.uname().nodename}-999999999-x"
    dead.mkdir()
    monkeypatch.setattr(np, "save", real)
    path = build(folder, 2, root)
    assert sorted(p.name for p in root.iterdir()) == [path.name]


def test_unreadable_images_are_named_or_skipped(tmp_path, caplog):
    folder = tmp_path / "hr"
    _images(folder, [(40, 40)] * 3)
    (folder / "1.png").write_bytes(b"not a png")
    (folder / "2.png").write_bytes((folder / "0.png").read_bytes()[:200])  # truncated
    with pytest.raises(ImageError) as e:
        build(folder, 2, tmp_path / "c")
    msg = str(e.value)
    assert "2 of 3 images cannot be used" in msg and "1.png" in msg and "2.png" in msg
    assert "--skip-bad-images" in msg
    assert not any((tmp_path / "c").iterdir())
    c = open_cache(folder, 2, tmp_path / "c", skip_bad=True)
    assert c.names == ["0"] and len(c.skipped) == 2
    assert "left out 2 unreadable images" in caplog.text


def test_patches_do_not_depend_on_workers_and_resume_at_any_step(tmp_path):
    folder = tmp_path / "hr"
    _images(folder, [(48, 40), (40, 64), (56, 56)])
    s = PatchSampler(open_cache(folder, 2, tmp_path / "c"), 2, 32, seed=3)
    ref = list(batches(s, range(0, 6), 4))
    for workers in (1, 2):
        got = list(batches(s, range(0, 6), 4, workers=workers, prefetch=2))
        assert all(torch.equal(a[k], b[k]) for a, b in zip(ref, got) for k in (0, 1))
    tail = list(batches(s, range(3, 6), 4, workers=2))  # a run resumed at step 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ref[3:], tail) for k in (0, 1))
    other = PatchSampler(s.cache, 2, 32, seed=4)
    assert not torch.equal(other.batch_at(0, 4)[1], ref[0][1])  # the seed matters
    # the draw covers every image, position and flip (not a constant)
    rows = np.concatenate([s.draw(t, 64) for t in range(20)])
    assert set(rows[:, 0]) == {0, 1, 2} and rows[:, 3:].mean() == pytest.approx(0.5, abs=0.05)


def test_sampler_pickles_without_the_pixels(tmp_path):
    import pickle
    _images(tmp_path / "hr", [(200, 200)])
    s = PatchSampler(open_cache(tmp_path / "hr", 2, tmp_path / "c"), 2, 32)
    s.batch_at(0, 2)  # maps opened
    assert len(pickle.dumps(s)) < 20_000  # the 160 KB of pixels stay in the file


def test_cache_cli(tmp_path, capsys):
    _images(tmp_path / "hr", [(40, 40)])
    assert cache_mod.main([str(tmp_path / "hr"), "--scale", "2", "--cache-dir",
                           str(tmp_path / "c"), "--workers", "0"]) == 0
    assert "1 images" in capsys.readouterr().out
    assert json.loads(next((tmp_path / "c").glob("*/meta.json")).read_text())["names"] == ["0"]
    assert cache_mod.main([str(tmp_path / "none"), "--scale", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
