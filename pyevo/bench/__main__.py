"""``python -m pyevo.bench``: the kernel microbenchmarks (pyevo/bench/__init__.py) as a table and a
JSON file.

    python -m pyevo.bench                     # CUDA if visible: DDPM/LDM layer shapes, fp32 + bf16, K = 8, 32
    python -m pyevo.bench --device cpu        # the same kinds of layer, smaller, fp32, K = 8
    python -m pyevo.bench --quick             # tiny shapes, a few seconds (the test suite's smoke run)
    python -m pyevo.bench --only attention --json out.json
    python -m pyevo.bench --kernel-choices kernel_choices.json   # also a kernel-choice table (GPU)

Columns: ours and the fastest baseline in ms, their ratio (baseline / ours: above 1 means ours is
faster), the work rate (TFLOP/s or GB/s) and its fraction of the peak measured in the same run,
and the largest relative difference between our output and the baseline's.

``--kernel-choices FILE`` also writes a kernel-choice table (pyevo/kernel_choices.py) from the run's
fused-conv and attention cases: pyevo's kernel against the best ATen baseline in the same eager
setting, per shape, for this GPU. Committed as pyevo/assets/kernel_choices.json, it decides what
those ops run under impl="auto" (experiments/device/README.md). A CPU run writes a table without
entries: the CPU kernels have one implementation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import warnings

import torch


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m pyevo.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda if visible)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke run)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated, e.g. float32,bfloat16 (default: cuda both, cpu float32)")
    parser.add_argument("--populations", default=None,
                        help="candidates per population case, comma-separated (default: cuda 8,32; cpu 8)")
    parser.add_argument("--only", default=None, help="run only cases whose op contains this text")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--kernel-choices", default=None, metavar="FILE",
                        help="also write a kernel-choice table from the fused-conv and attention cases")
    return parser.parse_args(argv)


def format_table(rows, peaks) -> str:
    header = ["op", "shape", "dtype", "ours ms", "baseline", "base ms", "x base", "rate", "% peak",
              "diff"]
    lines = []
    for row in rows:
        timed = {k: v for k, v in row["baselines"].items() if "ms" in v}
        best_name, best = min(timed.items(), key=lambda kv: kv[1]["ms"]) if timed else ("-", None)
        rate = (f"{row['tflops']:.2f} TF/s" if "tflops" in row else f"{row['gbps']:.0f} GB/s")
        fraction = row.get("fraction_of_peak")
        lines.append([row["op"], row["shape"], row["dtype"], f"{row['ours_ms']:.4f}", best_name,
                      f"{best['ms']:.4f}" if best else "-", f"{best['speedup']:.2f}" if best else "-",
                      rate, f"{100 * fraction:.1f}" if fraction is not None else "-",
                      f"{row['max_rel_diff']:.1e}" if "max_rel_diff" in row else "-"])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    render = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    peak_line = ("peaks: " + ", ".join(f"{k} matmul {v:.3g} TFLOP/s" for k, v in peaks["matmul_tflops"].items())
                 + f", copy {peaks['copy_gbps']:.3g} GB/s (read + write)")
    return "\n".join([peak_line, render(header), render(["-" * w for w in widths])] + [render(l) for l in lines])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    """Runs the benchmark; the process-wide settings it changes (threads, TF32) are as they were
    afterwards, so that a caller in the same process is not affected."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:3]


def _main(argv) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")  # SDPA backends that refuse a shape say so at length
    import pyevo
    from pyevo.bench import Timer, kernel_choice_entries, measure_peaks, run_case, shape_sets
    from pyevo.kernel_choices import cuda_device_identity, write_kernel_choices
    from pyevo.runfolder import atomic_write_text

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("pyevo.bench: error: --device cuda asked for, but this torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if args.dtypes:
        dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",")]
    else:
        dtypes = [torch.bfloat16, torch.float32] if cuda else [torch.float32]
    if args.populations:
        populations = [int(v) for v in args.populations.split(",")]
    else:
        populations = [4] if args.quick else ([8, 32] if cuda else [8])
    repeats = args.repeats or (3 if args.quick else (10 if cuda else 5))
    timer = Timer(device, warmup=1 if args.quick else args.warmup, repeats=repeats,
                  target_ms=0.2 if args.quick else 1.0)
    # TF32 as PyTorch's defaults have it for convolutions would make the float32 baseline a
    # different precision: off for both, so float32 means float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    cases = shape_sets(device, args.quick, dtypes, populations)
    if args.only:
        cases = [c for c in cases if args.only in c.op]
    peaks = measure_peaks(device, dtypes, timer, quick=args.quick)
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20) if cuda else 0
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "torch": torch.__version__, "build_info": pyevo.build_info(), "quick": args.quick,
            # Ours is pyevo's kernel, asked for per call (impl="pyevo") where the op also has
            # ATen's: the figures are what impl="auto" is chosen from (--kernel-choices).
            "threads": torch.get_num_threads(), "tf32": False, "ours_kernel": "pyevo",
            "repeats": repeats,
            "host": platform.node(), "cpu_count": os.cpu_count(), "cases": len(cases)}
    rows = []

    def write(complete: bool) -> None:
        # After every case, so a run cut short still leaves what it measured; atomically, so a run killed
        # mid-write leaves the previous case's file rather than half a JSON.
        atomic_write_text(args.json, json.dumps({"meta": {**meta, "complete": complete}, "peaks": peaks,
                                                 "rows": rows}, indent=1))
        if args.kernel_choices:
            write_choices(complete)

    def write_choices(complete: bool) -> None:
        if not cuda:
            write_kernel_choices(args.kernel_choices, [], note=f"python -m pyevo.bench on the CPU, {meta['date']}: "
                                 "no entries, the CPU kernels have one implementation")
            return
        name, capability = cuda_device_identity(device)
        command = "python -m pyevo.bench" + (" --quick" if args.quick else "")
        entries = kernel_choice_entries(rows, name, capability, torch.__version__, meta["date"][:10],
                                        source=command)
        incomplete = "" if complete else " (cut short: the cases measured so far)"
        write_kernel_choices(args.kernel_choices, entries, note=f"{command} on {name}, {meta['date']}{incomplete}")

    for index, case in enumerate(cases):
        row = run_case(case, device, timer, peaks, l2_bytes, seed=index)
        rows.append(row)
        print(f"[{index + 1}/{len(cases)}] {row['op']} {row['shape']} {row['dtype']}: "
              f"{row['ours_ms']:.4f} ms", flush=True)
        write(complete=False)
        if cuda:
            torch.cuda.empty_cache()
    write(complete=True)
    print()
    print(f"{meta['device']}, torch {meta['torch']}, {meta['date']}")
    print(format_table(rows, peaks))
    print(f"\nresults: {args.json}")
    if args.kernel_choices:
        print(f"kernel choices: {args.kernel_choices}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
