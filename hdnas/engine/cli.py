"""The command line of search and train: a new run or ``--resume RUN_DIR``, on one process or
under torchrun. The one place where errors become exit statuses: ``error: MESSAGE`` on stderr,
status 2 for bad settings or data (``ValueError``), 1 for a run folder or device that cannot be
used (``RunError``) and for failed collectives."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hdnas.engine import allocator
from hdnas.engine.config import FIELD_HELP, add_config_arguments, config_from_args
from hdnas.engine.distributed import Dist, describe_failure, init_from_env, is_comm_failure
from hdnas.engine.errors import RunError
from hdnas.engine.rundir import new_run_dir, read_run, save_config, setup_logging
from hdnas.engine.runtime import passive_openmp_warning

log = logging.getLogger("hdnas")


def parser(cfg_cls, presets: dict, prog: str, doc: str, add_arguments=None):
    """``--resume``, ``--preset``, ``--quiet``, the command's own flags, one flag per field."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(presets),
                   help="start from these settings (each one's differences from the release: "
                        "docs/presets.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console log")
    if add_arguments:
        add_arguments(p)
    p.epilog = ((p.epilog or "") + " Distributed: torchrun --nproc-per-node N -m "
                + prog.split()[-1] + " ... (docs/distributed.md).").strip()
    add_config_arguments(p, cfg_cls, FIELD_HELP)
    return p


def cli_main(argv, loop_cls, cfg_cls, presets: dict, prog: str, doc: str,
             add_arguments=None, adjust_config=None) -> int:
    """Parse ``argv``, start or resume the run of ``loop_cls``, return the exit status."""
    args = parser(cfg_cls, presets, prog, doc, add_arguments).parse_args(argv)
    allocator.tune()  # reuse freed memory between steps (HDNAS_MALLOC=default: glibc's default)
    try:
        d = init_from_env(args.device or "auto")
    except (ValueError, RuntimeError) as e:
        print(f"error: cannot start the distributed run: {e}", file=sys.stderr)
        return 2
    ended = False
    try:
        code = _run(args, d, loop_cls, cfg_cls, presets, adjust_config)
        ended = True
        return code
    except RunError as e:
        raise SystemExit(f"error: {e}") from None
    except ValueError as e:  # DataError, SearchSpaceError, GenotypeError, bad settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only failed collectives are explained here
        if d.enabled and is_comm_failure(e):
            print(f"error: {describe_failure(d, e)}", file=sys.stderr)
            return 1
        raise
    finally:
        d.close(sync=ended)


def _resume(args, d: Dist, loop_cls, cfg_cls, quiet: bool):
    run_dir = Path(args.resume)
    # rank 0 reads the folder and sends it to the others, which need no shared filesystem
    resolved, state = d.on_main(lambda: read_run(run_dir, loop_cls.kind))
    cfg = cfg_cls(**resolved)
    if d.is_main:
        setup_logging(run_dir, quiet)
    loop = loop_cls(cfg, run_dir, d)
    loop.restore(state)
    loop.truncate_after(loop.step)
    log.info("resumed %s at step %d", run_dir, loop.step)
    return loop


def _start(args, d: Dist, loop_cls, cfg_cls, presets, adjust_config, quiet: bool):
    given = {k: v for k, v in vars(args).items() if v not in (None, False)}
    cfg = config_from_args(cfg_cls, presets.get(args.preset, {}), args)
    if adjust_config:
        adjust_config(cfg, args)
    cfg.validate()
    if cfg.batch % d.world:
        raise ValueError(f"--batch {cfg.batch} (the global batch) is not divisible by the "
                         f"{d.world} ranks")
    run_dir = Path(d.on_main(lambda: str(new_run_dir(cfg.out, loop_cls.name))))
    cfg.out = str(run_dir)
    if d.is_main:
        setup_logging(run_dir, quiet)
    loop = loop_cls(cfg, run_dir, d)
    if d.is_main:
        save_config(run_dir, loop_cls.kind, given, cfg)
    log.info("run folder %s", run_dir)
    return loop


def _run(args, d: Dist, loop_cls, cfg_cls, presets, adjust_config) -> int:
    quiet = args.quiet or not d.is_main  # one console (and one log file) per run: rank 0's
    if args.resume:
        loop = _resume(args, d, loop_cls, cfg_cls, quiet)
    else:
        loop = _start(args, d, loop_cls, cfg_cls, presets, adjust_config, quiet)
    cfg = loop.cfg
    if d.enabled:
        log.info("distributed: %d ranks (%s), global batch %d = %d per rank", d.world, d.backend,
                 cfg.batch, cfg.batch // d.world)
    log.info("%s", loop.summary())
    warning = passive_openmp_warning()
    if warning:
        log.warning("%s", warning)
    result = loop.run(quiet=quiet)
    if d.is_main:
        print(loop.finish(result))
    return 0
