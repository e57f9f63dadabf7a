"""Summary of a device run (experiments/device/run.sh): step status, test counts, sanitizer
result, the benchmark against the issue's targets, and the search's teacher vs student latency.
Prints a short table and writes it to OUT/summary.md.

    python experiments/device/summarize.py --out OUT --steps STEPS.tsv [--total SECONDS]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys


def read(path: pathlib.Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def pytest_counts(log: str) -> str:
    lines = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    return lines[-1].strip("= ").strip() if lines else "no pytest summary line"


def sanitizer_result(log: str) -> str:
    summaries = re.findall(r"ERROR SUMMARY: (\d+) error", log)
    if not summaries:
        return log.strip().splitlines()[0] if log.strip() else "no output"
    return f"{sum(int(s) for s in summaries)} memcheck errors; pytest: {pytest_counts(log)}"


def best_baseline(row: dict, prefix: str = "") -> tuple[str, dict] | tuple[None, None]:
    timed = {k: v for k, v in row["baselines"].items() if "ms" in v and k.startswith(prefix)}
    if not timed:
        return None, None
    return min(timed.items(), key=lambda kv: kv[1]["ms"])


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, each with the worst and median case measured."""
    lines = []

    def report(name, values, threshold, unit="x"):
        if not values:
            lines.append(f"| {name} | - | - | not measured |")
            return
        worst = min(values, key=lambda v: v[0])
        median = statistics.median(v[0] for v in values)
        met = sum(v[0] >= threshold for v in values)
        lines.append(f"| {name} (target >= {threshold:g}{unit}) | {worst[0]:.2f}{unit} ({worst[1]}) | "
                     f"{median:.2f}{unit} | {met}/{len(values)} cases met |")

    def label(row):
        return f"{row['shape']} {row['dtype']}"

    def speedups(op, baseline):
        out = []
        for row in rows:
            if row["op"] == op and "speedup" in row["baselines"].get(baseline, {}):
                out.append((row["baselines"][baseline]["speedup"], label(row)))
        return out

    report("GroupNorm+SiLU vs eager", speedups("gn+silu", "eager"), 3.0)
    report("GroupNorm+SiLU vs eager as a CUDA graph", speedups("gn+silu", "eager graph"), 1.0)
    # A same-size clone in a graph moves the same bytes: its time over ours is our share of that bandwidth.
    report("GroupNorm+SiLU, fraction of a graph clone's bandwidth", speedups("gn+silu", "clone graph"), 0.8, "")
    report("GroupNorm+SiLU, fraction of copy bandwidth",
           [(row["fraction_of_peak"], label(row)) for row in rows if row["op"] == "gn+silu"], 0.5, "")
    report("pop GroupNorm+SiLU vs its loop as a CUDA graph", speedups("pop-gn+silu", "loop graph"), 1.3)
    pop_attention = []
    for row in rows:
        if row["op"] == "pop-attention shared-input":
            name, best = best_baseline(row, "loop")
            if best:
                pop_attention.append((best["speedup"], f"{label(row)} vs {name}"))
    report("pop attention vs best SDPA loop", pop_attention, 2.0)
    pop_attention_graph = []
    for row in rows:
        if row["op"] == "pop-attention shared-input":
            timed = {k: v for k, v in row["baselines"].items() if "ms" in v and k.endswith(" graph")}
            if timed:
                name, best = min(timed.items(), key=lambda kv: kv[1]["ms"])
                pop_attention_graph.append((best["speedup"], f"{label(row)} vs {name}"))
    report("pop attention vs best SDPA loop as a CUDA graph", pop_attention_graph, 1.3)
    single = []
    for row in rows:
        if row["op"] == "attention" and " S256 " in f" {row['shape']} ":
            head_dim = int(re.search(r"x(\d+)", row["shape"].split("H")[-1]).group(1))
            name, best = best_baseline(row)
            if best and 32 <= head_dim <= 64:
                single.append((best["speedup"], f"{label(row)} vs {name}"))
    report("one attention vs best SDPA, S=256, d 32-64", single, 0.9)
    return lines


def kernel_choice_lines(path: pathlib.Path) -> list[str]:
    """One line on the kernel-choice table the benchmark wrote: its entries and where pyevo's won."""
    if not path.is_file():
        return ["kernel choices: none written", ""]
    try:
        entries = json.loads(path.read_text()).get("entries", [])
    except ValueError:
        return [f"kernel choices: {path.name} is not JSON", ""]
    ours = [f"{e['op']} {e['dtype']} {e['aten_ms'] / e['pyevo_ms']:.2f}x" for e in entries if e.get("kernel") == "pyevo"]
    return [f"kernel choices ({path.name}, to commit as pyevo/assets/kernel_choices.json): {len(entries)} "
            f"entries, pyevo's chosen in {len(ours)}" + (f": {', '.join(ours)}" if ours else ""), ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", required=True)
    parser.add_argument("--total", type=int, default=None)
    parser.add_argument("--cpu-report", default=None, help="report.json of the same search on the CPU")
    parser.add_argument("--runtime", default=None, help="runtime_latency.py's JSON")
    parser.add_argument("--bench-log", default=None, help="the benchmark's log: its end is shown if it failed")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    md = ["# pyevo device run", ""]

    bench = {}
    if (out / "bench.json").is_file():
        bench = json.loads((out / "bench.json").read_text())
    meta = bench.get("meta", {})
    if meta:
        md += [f"{meta.get('device')}, torch {meta.get('torch')}, {meta.get('date')}, "
               f"pyevo build {meta.get('build_info')}", ""]

    md += ["| step | exit | seconds | result |", "|---|---|---|---|"]
    results = {"tests": pytest_counts(read(out / "tests.log")),
               "sanitizer": sanitizer_result(read(out / "sanitizer.log")),
               "bench": (f"{len(bench.get('rows', []))}/{meta.get('cases', '?')} cases"
                         + ("" if meta.get("complete") else " (incomplete)")) if bench else "no bench.json",
               "build": (read(out / "build.log").strip().splitlines() or ["no log"])[-1][:120]}
    bench_failed = False
    for line in read(pathlib.Path(args.steps)).splitlines():
        name, rc, seconds = (line.split("\t") + ["", "", ""])[:3]
        md.append(f"| {name} | {rc} | {seconds} | {results.get(name, '')} |")
        bench_failed |= name == "bench" and rc != "0"
    if args.total is not None:
        md.append(f"| total | | {args.total} | |")
    md.append("")
    if bench_failed and args.bench_log:  # the log itself stays on the device machine
        tail = read(pathlib.Path(args.bench_log)).strip().splitlines()[-15:]
        md += ["bench log, last lines:", "```", *tail, "```", ""]
    md += kernel_choice_lines(out / "kernel_choices.json")

    report = {}
    if (out / "search_report.json").is_file():
        report = json.loads((out / "search_report.json").read_text())
    if report:
        t, s = report["teacher"], report["student"]
        md += ["| search (digits teacher, short run) | teacher | student | ratio |", "|---|---|---|---|",
               f"| latency on {report.get('device')} (ms) | {t['latency_ms']:.3f} | {s['latency_ms']:.3f} | "
               f"{s['latency_ms'] / t['latency_ms']:.2f} |",
               f"| MACs | {t['macs']:,} | {s['macs']:,} | {s['macs'] / t['macs']:.2f} |"]
        if "latency_estimate_error" in s:
            md.append(f"| per-block latency estimate (ms) | | {s['latency_estimate_ms']:.3f} | "
                      f"error {100 * s['latency_estimate_error']:+.1f}% |")
        if "selection" in report:
            sel = report["selection"]
            md.append(f"| latency ratio estimated at selection | | | {sel['latency_ratio_estimate']:.2f} "
                      f"(error {100 * sel['latency_ratio_error']:+.1f}%) |")
        md.append("")
        cpu_file = pathlib.Path(args.cpu_report) if args.cpu_report else None
        cpu = json.loads(cpu_file.read_text()) if cpu_file and cpu_file.is_file() else {}
        md += [f"| seconds per stage | {report.get('device')} ({report.get('train_dtype', '?')}) | "
               f"{cpu.get('device', 'cpu')} | cpu / {report.get('device')} |", "|---|---|---|---|"]
        for stage, value in report.get("stages", {}).items():
            there = cpu.get("stages", {}).get(stage, {}).get("seconds")
            ratio = f"{there / value['seconds']:.2f}" if there and value["seconds"] else ""
            md.append(f"| {stage} | {value['seconds']:.1f} | {'' if there is None else f'{there:.1f}'} | {ratio} |")
        md.append("")
    else:
        md += ["search: no report (see search.log)", ""]

    runtime_file = pathlib.Path(args.runtime) if args.runtime else None
    runtime = json.loads(runtime_file.read_text()) if runtime_file and runtime_file.is_file() else {}
    if runtime:
        md += [f"| DDPM-CIFAR10 config, batch {runtime['batch']} {runtime['dtype']}, student at "
               f"{runtime['macs_ratio']:.3f} MACs | teacher (ms) | student (ms) | teacher / student |",
               "|---|---|---|---|"]
        md += [f"| {name} | {row['teacher_ms']:.3f} | {row['student_ms']:.3f} | "
               f"{row['teacher_ms'] / row['student_ms']:.2f}x |" for name, row in runtime["runtimes"].items()]
        md += [f"| target: {label} | | | {value:.2f}x |" for label, value in runtime["targets"].items()] + [""]

    rows = bench.get("rows", [])
    if rows:
        peaks = bench["peaks"]
        md += ["peaks measured in the run: " + ", ".join(
            f"{k} matmul {v:.3g} TFLOP/s" for k, v in peaks["matmul_tflops"].items())
               + f", device copy {peaks['copy_gbps']:.4g} GB/s (read + write)", "",
               "| target | worst case | median | |", "|---|---|---|---|"] + target_lines(rows) + [""]
    short = "\n".join(md) + "\n"
    if rows:
        md += ["| op | shape | dtype | ours ms | best baseline ms | x best | % peak | diff |",
               "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            name, best = best_baseline(row)
            fraction = row.get("fraction_of_peak")
            cells = [row["op"], row["shape"], row["dtype"], f"{row['ours_ms']:.4f}",
                     f"{name} {best['ms']:.4f}" if best else "-",
                     f"{best['speedup']:.2f}" if best else "-",
                     f"{100 * fraction:.1f}" if fraction is not None else "-",
                     f"{row['max_rel_diff']:.1e}" if "max_rel_diff" in row else "-"]
            md.append("| " + " | ".join(cells) + " |")
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text)
    # Printed: everything but the per-case table (that is in summary.md), so it fits the end of
    # the output a device call returns.
    print(short)
    print(f"per-case table: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
