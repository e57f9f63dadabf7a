"""``python -m pyevo.study``: run (or resume) the evidence study and write its results page.

    python -m pyevo.study                         # the full study into runs/study, then experiments/RESULTS.md
    python -m pyevo.study --teacher latent-digits # on the latent teacher: experiments/RESULTS-latent-digits.md
    python -m pyevo.study --mini --out runs/mini --results runs/mini/RESULTS.md   # the miniature (CI)
    python -m pyevo.study --only 'pyevo-*' 'latency-pyevo-*'                      # some units (and what they need)

Each unit runs in its own process (``--unit NAME``, which the scheduler calls); units whose result is
there with the same key are skipped, so a killed study resumes where it stopped. The results page and
plots are rewritten after every finished unit, from whatever has finished (the rest is marked pending).
"""
from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pyevo.runfolder import atomic_write_json
from pyevo.study.plan import DEFAULT_TEACHER, TEACHERS, Unit, build_plan, study_settings, unit_keys
from pyevo.study.provenance import code_version
from pyevo.study.units import READY, RUNNERS, StudyContext, changed_pipeline_defaults

log = logging.getLogger("pyevo.study")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyevo.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study", help="work folder: models, run folders, logs (default runs/study)")
    parser.add_argument("--teacher", choices=TEACHERS, default=DEFAULT_TEACHER,
                        help=f"the built-in teacher the study runs on (default {DEFAULT_TEACHER})")
    parser.add_argument("--results", help="the results page to write (default experiments/RESULTS.md; "
                        "experiments/RESULTS-<teacher>.md for another teacher)")
    parser.add_argument("--state", help="the units' results, kept to go on from in another sitting (default "
                        "experiments/results, experiments/results-<teacher> for another teacher; committed with the page)")
    parser.add_argument("--mini", action="store_true", help="the miniature study (tiny steps, one seed, two arms)")
    parser.add_argument("--workers", type=int, default=0, help="units at once in the parallel phase (default: cores)")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="run only the units matching these patterns "
                        "(shell-style) and those they need")
    parser.add_argument("--report-only", action="store_true", help="write the results page from what has finished")
    parser.add_argument("--unit", help=argparse.SUPPRESS)  # the scheduler's child process: run one unit
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = study_settings(args.teacher, args.mini)
    suffix = "" if args.teacher == DEFAULT_TEACHER else f"-{args.teacher}"
    args.results = args.results or f"experiments/RESULTS{suffix}.md"
    args.state = args.state or f"experiments/results{suffix}"
    units, arms = build_plan(settings)
    keys = unit_keys(units)
    out = Path(args.out)
    context = StudyContext(out, Path(args.state), settings, {u.name: u for u in units}, keys)
    if args.unit:
        return run_unit(context, args.unit, args.threads)
    from pyevo.study.report import write_results

    def report() -> None:
        # The command that runs the study (a page rewritten with --report-only names it too).
        given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
        write_results(Path(args.results), context, arms, command=" ".join(["python -m pyevo.study", *given]))

    if args.report_only:
        report()
        return 0
    changed = changed_pipeline_defaults(context)
    if changed:
        print(f"pyevo.study: the pipeline's defaults changed since the units in {args.state} ran "
              f"({'; '.join(changed)}); give another --state to run the study under today's defaults",
              file=sys.stderr)
        return 2
    wanted = select_units(units, args.only) if args.only else {u.name for u in units}
    failed = schedule(context, [u for u in units if u.name in wanted], args.workers or os.cpu_count() or 1,
                      ["--teacher", args.teacher] + (["--mini"] if args.mini else []), report)
    report()
    if failed:
        print(f"pyevo.study: {len(failed)} unit(s) failed: {', '.join(failed)} (logs in {out / 'logs'}); "
              "run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def select_units(units: list[Unit], patterns: list[str]) -> set[str]:
    by_name = {u.name: u for u in units}
    chosen: set[str] = set()

    def need(name: str) -> None:
        if name not in chosen:
            chosen.add(name)
            for dep in by_name[name].deps:
                need(dep)

    for unit in units:
        if any(fnmatch.fnmatch(unit.name, p) for p in patterns):
            need(unit.name)
    if not chosen:
        raise SystemExit(f"pyevo.study: no unit matches {' '.join(patterns)}")
    return chosen


def work_ready(context: StudyContext, name: str) -> bool:
    """What later units need of the unit's work folder is there (a base's search; the work folder is not
    committed, so another sitting or a fresh clone starts without it)."""
    unit = context.units[name]
    return unit.kind not in READY or READY[unit.kind](unit, context)


def is_done(context: StudyContext, name: str) -> bool:
    return context.stored(name) is not None and work_ready(context, name)


def units_to_run(context: StudyContext, units: list[Unit]) -> tuple[list[Unit], set[str]]:
    """Of ``units`` (the selection, in plan order), those to run, and the names of the units done. A unit with
    its result runs again only where its work folder is gone and a unit still to run needs it: a finished study
    in a fresh clone runs nothing."""
    recorded = {name for name in context.units if context.stored(name) is not None}
    selected = {unit.name for unit in units}
    run = {unit.name for unit in units if unit.name not in recorded}
    while True:  # what a unit to run needs, and in turn what that needs
        needed = {dep for name in run for dep in context.units[name].deps}
        again = {dep for dep in needed & selected & recorded if dep not in run and not work_ready(context, dep)}
        if not again:
            break
        run |= again
    # A needed unit outside the selection whose work is gone is not done: its dependants wait (and are named).
    done = {name for name in recorded - run if name not in needed or work_ready(context, name)}
    return [unit for unit in units if unit.name in run], done


def run_unit(context: StudyContext, name: str, threads: int) -> int:
    """One unit, in this process: its folder is started afresh when it holds another key's work."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    unit, key = context.units[name], context.keys[name]
    folder, marker = context.folder(name), context.out / "started" / name
    if folder.exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(folder)  # another setting's work: it must not be resumed into this unit
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    code = code_version()  # the code this process imported: a commit made while the unit runs is not its code
    start = time.perf_counter()
    result = RUNNERS[unit.kind](unit, context)
    atomic_write_json(context.result_path(name), {"key": key, "kind": unit.kind, "spec": unit.spec,
                                                       "seconds": round(time.perf_counter() - start, 1),
                                                       "threads": torch.get_num_threads(), "code": code,
                                                       "result": result})
    return 0


def schedule(context: StudyContext, units: list[Unit], workers: int, settings_args: list[str], report) -> list[str]:
    """Run ``units`` (those not done) as child processes in the plan's order: the ones that time things alone
    with every core, the others ``workers`` at a time with cores / workers threads each; phase 2 once every
    other unit is through; each child gets ``settings_args`` (the study's teacher and size). Returns the names of
    the units that failed (and those that needed them are left)."""
    cores = os.cpu_count() or 1
    pending, done = units_to_run(context, units)
    failed: list[str] = []
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    (context.out / "logs").mkdir(parents=True, exist_ok=True)
    log.info("%d of %d units to run", len(pending), len(units))

    failed_closure: set[str] = set()  # the failed units and those that need them

    while pending or running:
        for name, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode == 0 and is_done(context, name):
                done.add(name)
                log.info("unit %s done in %.0f s", name, time.perf_counter() - started)
                report()
            else:
                failed.append(name)
                failed_closure.add(name)
                log.error("unit %s failed (exit %s): see %s", name, process.returncode,
                          context.out / "logs" / f"{name}.log")
        for unit in list(pending):
            if any(dep in failed_closure for dep in unit.deps):
                pending.remove(unit)
                failed_closure.add(unit.name)
        lowest = min((u.phase for u in pending), default=None)
        ready = [u for u in pending if u.phase == lowest and all(d in done for d in u.deps)]
        for unit in ready:
            alone = unit.alone
            if alone and running:
                break  # it waits for the running units to finish; nothing starts meanwhile
            if any(context.units[n].alone for n in running) or len(running) >= workers:
                break
            threads = cores if alone else max(1, cores // workers)
            log_file = open(context.out / "logs" / f"{unit.name}.log", "a")
            command = [sys.executable, "-m", "pyevo.study", "--out", str(context.out), "--state", str(context.state),
                       "--unit", unit.name,
                       "--threads", str(threads), *settings_args]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            running[unit.name] = (subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                                  time.perf_counter())
            log_file.close()
            pending.remove(unit)
            log.info("unit %s started (%d thread(s))", unit.name, threads)
            if alone:
                break
        if pending and not running and not ready:
            # Nothing can start: what is left waits on units outside this selection that are not done.
            waiting = sorted({d for u in pending for d in u.deps if d not in done})
            log.error("units %s wait on %s, which are not done", ", ".join(u.name for u in pending), ", ".join(waiting))
            failed.extend(u.name for u in pending)
            break
        time.sleep(0.5)
    return failed


if __name__ == "__main__":
    sys.exit(main())
