"""Facts of the SD-v1.5 UNet architecture (random weights) at full width and at reduced widths, to decide
which width pyevo's whole run can train on this machine, and to report the full-width teacher's figures
whatever width the run takes:

- parameters and MACs at batch 1 (``pyevo.cost.count_macs``, attention counted; 64x64 latents, 77 x 768
  text states), and the CPU latency of one UNet call at batch 1 (median of repeats, float32, 2 threads);
- the supernet's shared parameters (5x5 kernels over the teacher's 3x3: ~25/9 of the conv weights),
  built one super-block at a time so that the full-width count fits in memory, and the memory the
  distillation stage's tensors need: teacher weights + supernet weights, gradients and Adam's two
  moments, all float32 = 4 bytes x (teacher + 4 x supernet), before any activation;
- the peak resident memory of this process (``resource.getrusage``).

    python experiments/sd15/arch_facts.py --divisors 1 2 4 --out runs/sd15/arch_facts.json
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_teacher import unet_config, unet_inputs  # noqa: E402


def facts(width_divisor: int, seed: int, repeats: int, threads: int) -> dict:
    import pyevo  # noqa: F401  (registers torch.ops.pyevo.*, which the super-blocks call)
    from diffusers import UNet2DConditionModel

    from pyevo.cost import count_macs, count_params
    from pyevo.latency import time_call
    from pyevo.space import searchable_blocks, unet_space
    from pyevo.supernet import SuperBlock

    torch.manual_seed(seed)
    config = unet_config(width_divisor)
    unet = UNet2DConditionModel(**config).eval().requires_grad_(False)
    inputs = unet_inputs(unet)
    params = count_params(unet)
    with torch.no_grad():
        macs = count_macs(unet, *inputs)
    start = time.perf_counter()
    latency_ms = time_call(lambda: unet(*inputs), "cpu", warmup=1, repeats=repeats, threads=threads)
    timing_s = time.perf_counter() - start
    blocks = searchable_blocks(unet)
    supernet_params, block_params = 0, {}
    for space in unet_space(unet):
        block = SuperBlock(blocks[space.name], space)
        block_params[space.name] = {"teacher": count_params(blocks[space.name]), "supernet": count_params(block)}
        supernet_params += block_params[space.name]["supernet"]
        del block
        gc.collect()
    searched = sum(v["teacher"] for v in block_params.values())
    # The supernet holds the searched blocks; the distillation also keeps the whole teacher for its forward.
    distill_bytes = 4 * (params + 4 * supernet_params)
    del unet
    gc.collect()
    return {"width_divisor": width_divisor, "block_out_channels": list(config["block_out_channels"]),
            "norm_num_groups": config["norm_num_groups"], "params": params, "macs": macs,
            "latency_ms": latency_ms, "latency_repeats": repeats, "threads": threads, "timing_s": timing_s,
            "searched_block_params": searched, "supernet_params": supernet_params,
            "distill_tensor_bytes": distill_bytes, "blocks": block_params,
            "peak_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--divisors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    rows = []
    for divisor in args.divisors:
        rows.append(facts(divisor, args.seed, args.repeats, args.threads))
        row = rows[-1]
        print(f"width /{divisor} {row['block_out_channels']}: {row['params']:,} params, {row['macs']:,} MACs, "
              f"{row['latency_ms']:.0f} ms, supernet {row['supernet_params']:,} params, distill tensors "
              f"{row['distill_tensor_bytes'] / 2**30:.1f} GiB, peak RSS so far "
              f"{row['peak_rss_bytes_so_far'] / 2**30:.1f} GiB", flush=True)
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                               "load_before": load_before, "load_after": load_after, "widths": rows}, indent=1))


if __name__ == "__main__":
    main()
