"""The command line of search and train: a new run or ``--resume RUN_DIR``, on one process or
under torchrun. The one place where errors become exit statuses (``EXIT_TEXT``): ``error:
MESSAGE`` on stderr and no traceback (``--debug`` shows it)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from hdnas.cliargs import add_common
from hdnas.engine import allocator
from hdnas.engine.config import FIELD_HELP, add_config_arguments, config_from_args, \
    config_from_dict, flag
from hdnas.engine.distributed import Dist, describe_failure, init_from_env, is_comm_failure
from hdnas.engine.errors import EXIT_DIVERGED, EXIT_FAILED, EXIT_USAGE, DivergedError, RunError
from hdnas.engine.rundir import (CONFIG, PREV, close_logging, discard_start, log_to_file,
                                 prepare_out, read_run, record_resume, save_config,
                                 set_aside_damaged, setup_logging)
from hdnas.engine.runtime import passive_openmp_warning

log = logging.getLogger("hdnas")

EXIT_TEXT = ("Exit status: 0 done; 2 bad options, data, run folder or run files (error: names "
             "them; nothing is written); 3 the run diverged (a loss, gradient or weight that is "
             "not a finite number): it stops at that step, its last checkpoint is the last good "
             "state; 1 the run failed on the way (a file that cannot be written, a lost rank, "
             "an internal error: --debug shows the traceback); 130 interrupted. A run that "
             "stops before its first checkpoint leaves nothing in --out.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """``error: MESSAGE`` and exit status 2, without the (long) usage."""
        self.exit(EXIT_USAGE, f"error: {message} ({self.prog} --help lists the options)\n")


def parser(cfg_cls, presets: dict, prog: str, doc: str, add_arguments=None):
    """``--resume``, ``--preset``, ``--quiet``, ``--debug``, the command's own flags, one flag
    per field."""
    p = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its settings and from its last "
                        "checkpoint (checkpoint.pt, or checkpoint.prev.pt when that one is "
                        "damaged). Of the settings only these may be given other values: "
                        + ", ".join(flag(n) for n in cfg_cls.RESUMABLE)
                        + " (--steps: more than the step the run reached, to extend it; the "
                        "warm-up and LR milestones stay at their steps; --val-every cannot turn "
                        "validation on or off); any other setting given must equal the run's")
    p.add_argument("--preset", choices=sorted(presets),
                   help="start from these settings (each one's differences from the release: "
                        "docs/presets.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console log")
    add_common(p)  # --debug
    if add_arguments:
        add_arguments(p)
    p.epilog = ((p.epilog or "") + " Distributed: torchrun --nproc-per-node N -m "
                + prog.split()[-1] + " ... (docs/distributed.md). " + EXIT_TEXT).strip()
    add_config_arguments(p, cfg_cls, FIELD_HELP)
    return p


def cli_main(argv, loop_cls, cfg_cls, presets: dict, prog: str, doc: str,
             add_arguments=None, adjust_args=None) -> int:
    """Parse ``argv``, start or resume the run of ``loop_cls``, return the exit status.
    ``adjust_args(args)``: the command's own flags into config fields (``ValueError``)."""
    try:
        args = parser(cfg_cls, presets, prog, doc, add_arguments).parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad option already explained (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    allocator.tune()  # reuse freed memory between steps (HDNAS_MALLOC=default: glibc's default)
    try:
        if adjust_args:
            adjust_args(args)
        d = init_from_env(args.device or "auto")
    except (ValueError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"error: cannot start the run: {e}", file=sys.stderr)
        return EXIT_USAGE
    ended = False
    try:
        code = _run(args, d, loop_cls, cfg_cls, presets)
        ended = True
        return code
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every error gets its status
        if args.debug:
            raise
        code, message = _explain(e, d)
        log_to_file(f"error: {message}")
        close_logging()
        print(f"error: {message}", file=sys.stderr)
        return code
    finally:
        d.close(sync=ended)


def _explain(e: BaseException, d: Dist) -> tuple[int, str]:
    """(exit status, message) of an error that ended the run."""
    if isinstance(e, DivergedError):
        return EXIT_DIVERGED, str(e)
    if isinstance(e, ValueError):  # RunError, DataError, SchemaError, CheckpointError, ...
        return EXIT_USAGE, str(e)
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted; --resume continues from the last checkpoint"
    if d.enabled and is_comm_failure(e):
        return EXIT_FAILED, describe_failure(d, e)
    if isinstance(e, OSError):
        return EXIT_FAILED, f"the run stopped: {e}"
    return EXIT_FAILED, f"{type(e).__name__}: {e} (--debug shows the traceback)"


def _given_settings(args, cfg_cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg_cls)
            if getattr(args, f.name) is not None}


def _overrides(cfg, given: dict, args, run_dir: Path, reached: int) -> dict:
    """The settings given with ``--resume`` that change the run (only ``RESUMABLE`` ones, checked);
    any other that differs from the run's is a ``RunError`` naming the conflict."""
    changed, conflicts = {}, []
    for name, value in given.items():
        old = getattr(cfg, name)
        if name == "out":
            if Path(value).resolve() != run_dir.resolve():
                conflicts.append(f"--out {value} (the run is in {run_dir})")
        elif value == old:
            continue
        elif name not in cfg.RESUMABLE:
            conflicts.append(f"{flag(name)} {value} (the run's: {old})")
        elif name == "val_every" and (value == 0) != (cfg.validation_interval() == 0):
            conflicts.append(f"--val-every {value} (the run's: {old}; turning validation on or "
                             "off changes the training images)")
        else:
            changed[name] = value
    if args.preset:
        conflicts.append(f"--preset {args.preset}")
    if conflicts:
        raise RunError(f"--resume {run_dir}: " + ", ".join(conflicts) + " conflict with the "
                       f"run's settings ({run_dir / CONFIG}); a resumed run keeps its settings "
                       "but for " + ", ".join(flag(n) for n in cfg.RESUMABLE))
    if "steps" in changed and changed["steps"] <= reached:
        raise RunError(f"--steps {changed['steps']}: the run in {run_dir} already reached step "
                       f"{reached}; give more steps to extend it")
    for name, value in list(changed.items()):
        changed.update(cfg.set(name, value))
    cfg.validate()
    return changed


def _resume(args, d: Dist, loop_cls, cfg_cls, quiet: bool):
    run_dir = Path(args.resume)
    # rank 0 reads the folder and sends it to the others, which need no shared filesystem
    doc, state, source, warnings = d.on_main(lambda: read_run(run_dir, loop_cls.kind))
    cfg = config_from_dict(cfg_cls, doc["resolved"], str(run_dir / CONFIG))
    if state["step"] > cfg.steps:
        raise RunError(f"{source} is at step {state['step']}, past the run's --steps "
                       f"{cfg.steps}: it is not this run's checkpoint")
    changed = _overrides(cfg, _given_settings(args, cfg_cls), args, run_dir, state["step"])
    loop = loop_cls(cfg, run_dir, d)
    try:
        loop.restore(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        why = " ".join(str(e).split())
        why = why[:300] + " ..." if len(why) > 300 else why
        raise RunError(f"{source} does not fit the run in {run_dir} (its config.json): "
                       f"{type(e).__name__}: {why}") from None
    if d.is_main:  # only now that the run resumes does its folder change
        if Path(source).name == PREV:
            set_aside_damaged(run_dir)
        setup_logging(run_dir, quiet)
        for w in warnings:
            log.warning("warning: %s", w)
            if quiet:
                print(f"warning: {w}", file=sys.stderr)
    if changed and d.is_main:
        record_resume(run_dir, doc, loop.step, changed, cfg)
    loop.truncate_after(loop.step)
    log.info("resumed %s at step %d from %s%s", run_dir, loop.step, source,
             f" with {changed}" if changed else "")
    return loop


def _start(args, d: Dist, loop_cls, cfg_cls, presets, quiet: bool):
    """A new run: its folder (new or empty), log, loop and config.json. Returns the loop and
    the cleanup that removes all of it (for a run that stops before its first checkpoint)."""
    given = {k: v for k, v in vars(args).items() if v not in (None, False)}
    cfg = config_from_args(cfg_cls, presets.get(args.preset, {}), args)
    cfg.validate()
    if cfg.batch % d.world:
        raise ValueError(f"--batch {cfg.batch} (the global batch) is not divisible by the "
                         f"{d.world} ranks")
    run_dir, created = d.on_main(lambda: prepare_out(cfg.out, loop_cls.name))
    cleanup = (lambda: discard_start(run_dir, created)) if d.is_main else (lambda: None)
    try:
        cfg.out = str(run_dir)
        if d.is_main:
            setup_logging(run_dir, quiet)
        loop = loop_cls(cfg, run_dir, d)
        if d.is_main:
            save_config(run_dir, loop_cls.kind, given, cfg)
    except BaseException:
        cleanup()
        raise
    log.info("run folder %s", run_dir)
    return loop, cleanup


def _run(args, d: Dist, loop_cls, cfg_cls, presets) -> int:
    quiet = args.quiet or not d.is_main  # one console (and one log file) per run: rank 0's
    if args.resume:
        loop, cleanup = _resume(args, d, loop_cls, cfg_cls, quiet), None
    else:
        loop, cleanup = _start(args, d, loop_cls, cfg_cls, presets, quiet)
    cfg = loop.cfg
    try:
        if d.enabled:
            log.info("distributed: %d ranks (%s), global batch %d = %d per rank", d.world,
                     d.backend, cfg.batch, cfg.batch // d.world)
        log.info("%s", loop.summary())
        log.info("threads: %s", loop.threads.reason)
        warning = passive_openmp_warning()
        if warning:
            log.warning("%s", warning)
        result = loop.run(quiet=quiet)
    except BaseException as e:
        if cleanup and loop.saved_step is None:  # nothing to resume: leave nothing behind
            cleanup()
            if isinstance(e, DivergedError):
                e.args = (f"{e}; it stopped before its first checkpoint and left nothing in "
                          f"{loop.run_dir}",)
        elif isinstance(e, DivergedError):
            e.args = (f"{e}; its last checkpoint (step {loop.saved_step}) in {loop.run_dir} is "
                      "the last good state",)
        raise
    if d.is_main:
        print(loop.finish(result))
    close_logging()
    return 0
