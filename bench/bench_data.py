"""Training data larger than RAM: cache build time, resident memory while sampling, and patches
per second served by 0, 2 and 4 DataLoader workers, next to the search step they must feed.

    python bench/bench_data.py --images 300 --size 2040x1360 --budget-mb 1024
    python bench/bench_data.py --images 120 --size 1020x680 --budget-mb 128   # a small machine

A synthetic folder of PNGs (smooth colour fields plus noise, so they compress like photographs
and decode at a realistic speed) is made once in --folder, decoded into the on-disk cache
(``hdnas.data.cache``), then sampled with batches of --batch HR patches of --patch through
``hdnas.data.train.batches`` as the search does. Memory is read from /proc: ``RssAnon`` is the
process's own memory (what a memory budget limits); ``RssFile`` is cached file pages of the
memory map, which the kernel drops under pressure. Prints a Markdown report.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hdnas import machine
from hdnas.data.cache import open_cache
from hdnas.data.train import PatchSampler, batches


def proc_memory(pid="self") -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def children_anon_mb() -> float:
    total = 0.0
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == me:
                    total += proc_memory(d.name).get("RssAnon", 0.0)
            except (OSError, IndexError, ValueError):
                pass
    return total


def make_folder(folder: Path, n: int, w: int, h: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in folder.glob("*.png")}
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"{i:04d}.png"
        if name in have:
            continue
        base = rng.integers(0, 255, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / name, compress_level=1)


def search_step_seconds(batch: int, patch: int, steps: int) -> float:
    """Mean seconds of a default-shape search step (C=48, 6 cells, all 9 ops, joint rule, both
    weight and architecture updates) at this batch and patch: what the loader must keep up with."""
    from hdnas.engine.search import Search, SearchConfig
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SearchConfig(batch=batch, patch=patch, steps=steps + 1, warmup=0, val_every=0,
                           out=tmp, ckpt_every=10**9, log_every=10**9)
        s = Search(cfg, Path(tmp))
        s.start_data(0, steps + 1)
        s.train_step()  # warm-up
        t = time.perf_counter()
        for _ in range(steps):
            s.train_step()
        return (time.perf_counter() - t) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="/tmp/hdnas_bench_data/hr")
    p.add_argument("--cache-dir", default="/tmp/hdnas_bench_data/cache")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", default="2040x1360", help="W x H of each image")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--budget-mb", type=float, default=1024.0,
                   help="the memory budget the decoded data must exceed several times")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="batches timed per worker count")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--build-workers", type=int, default=2)
    p.add_argument("--step-batch", type=int, default=16,
                   help="batch of the timed search step (0: skip it)")
    p.add_argument("--step-steps", type=int, default=2)
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    folder = Path(args.folder)
    t = time.perf_counter()
    make_folder(folder, args.images, w, h)
    t_make = time.perf_counter() - t
    t = time.perf_counter()
    cache = open_cache(folder, args.scale, args.cache_dir, workers=args.build_workers,
                       progress=True)
    t_build = time.perf_counter() - t
    decoded = cache.nbytes() / 2**20
    print(f"# bench_data: {machine.summary_line()}\n")
    print(f"- folder: {args.images} PNGs of {w}x{h}, {sum(f.stat().st_size for f in folder.glob('*.png')) / 2**20:.0f} MiB "
          f"on disk (made in {t_make:.0f} s)")
    print(f"- cache: {decoded:.0f} MiB decoded uint8 HR + x{args.scale} LR = "
          f"{decoded / args.budget_mb:.1f} x the {args.budget_mb:.0f} MiB budget; built in "
          f"{t_build:.0f} s with {args.build_workers} workers (or found)")
    sampler = PatchSampler(cache, args.scale, args.patch, seed=0)
    print("\n| workers | patches/s | batches/s | RssAnon main MiB | RssFile main MiB | "
          "RssAnon workers MiB | peak RSS main MiB |\n|---|---|---|---|---|---|---|")
    for workers in args.workers:
        it = batches(sampler, range(10**9), args.batch, workers=workers, prefetch=4)
        next(it)  # workers started, first batches in flight
        t = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        dt = time.perf_counter() - t
        mem, kids = proc_memory(), children_anon_mb()
        print(f"| {workers} | {args.batches * args.batch / dt:.0f} | {args.batches / dt:.1f} | "
              f"{mem['RssAnon']:.0f} | {mem['RssFile']:.0f} | {kids:.0f} | {mem['VmHWM']:.0f} |",
              flush=True)
        del it
    if args.step_batch:
        sec = search_step_seconds(args.step_batch, args.patch, args.step_steps)
        print(f"\nsearch step (C=48, 6 cells, 9 ops, joint, weight + arch update, batch "
              f"{args.step_batch}, HR patch {args.patch}) on this CPU: {sec:.2f} s = "
              f"{2 * args.step_batch / sec:.0f} patches/s needed (a step draws a weight and an "
              "arch batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
