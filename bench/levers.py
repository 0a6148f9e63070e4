"""Caching and quantization levers: speed against the image they change, side by side.

For each setting, one runtime of the small model on the CPU; the same requests (same prompts
and seeds) go through every runtime in rounds that alternate the settings, so load from
elsewhere lands on all alike. Per setting: seconds per image (median), the speedup over the
plain runtime, and the PSNR of its images against the plain runtime's (same seed; higher is
closer, inf is identical).

- SD 1.5 small: the denoiser's weights as they are, and int8 weight-only (torchao);
- Flux small: no cache, First Block Cache at several thresholds, MagCache at two, TaylorSeer,
  Pyramid Attention Broadcast and FasterCache at an interval or two (diffusers' hooks), and
  int8 weight-only.

FP8 needs FP8 tensor cores: bench/gpu.py measures it where there are some.

    .venv/bin/python bench/levers.py [--images 2] [--rounds 2] [--steps 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
import numpy as np

SETTINGS = {
    "sd15": {
        "plain": {},
        "int8 weight-only": {"quantization": "Int8WeightOnly"},
    },
    "flux": {
        "plain": {},
        "FirstBlockCache 0.05": {"cache": "FirstBlockCache", "cache_threshold": 0.05},
        "FirstBlockCache 0.2": {"cache": "FirstBlockCache", "cache_threshold": 0.2},
        "FirstBlockCache 0.4": {"cache": "FirstBlockCache", "cache_threshold": 0.4},
        # MagCache skips by Flux's published magnitude ratios, whatever the weights: its
        # authors' threshold, then a looser one.
        "MagCache 0.06": {"cache": "MagCache", "cache_threshold": 0.06},
        "MagCache 0.2": {"cache": "MagCache", "cache_threshold": 0.2},
        # The attention caches: full attention every `interval` steps.
        "TaylorSeerCache 3": {"cache": "TaylorSeerCache", "cache_interval": 3},
        "PyramidAttentionBroadcast 2": {"cache": "PyramidAttentionBroadcast", "cache_interval": 2},
        "PyramidAttentionBroadcast 3": {"cache": "PyramidAttentionBroadcast", "cache_interval": 3},
        "FasterCache 2": {"cache": "FasterCache", "cache_interval": 2},
        "int8 weight-only": {"quantization": "Int8WeightOnly"},
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", choices=["small", "tiny"], default="small")
    parser.add_argument("--families", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def measure_family(family: str, model: Path, args) -> dict:
    runtimes = {
        name: common.runtime_for(model, default_steps=args.steps, max_batch_size=1,
                                 torch_threads=2, **overrides)
        for name, overrides in SETTINGS[family].items()
    }
    seconds = {name: [] for name in runtimes}
    images = {name: {} for name in runtimes}
    try:
        for _ in range(args.rounds):
            for name, runtime in runtimes.items():
                for i in range(args.images):
                    params = runtime.params(f"a lighthouse at dusk, number {i}", seed=i)
                    started = time.perf_counter()
                    (image,) = runtime.engine.generate(params, timeout_s=600)
                    seconds[name].append(time.perf_counter() - started)
                    images[name][i] = np.asarray(image)
    finally:
        for runtime in runtimes.values():
            runtime.close(timeout=30)
    plain = common.percentile(seconds["plain"], 50)
    rows = {}
    for name in runtimes:
        per_image = common.percentile(seconds[name], 50)
        closeness = [common.psnr_db(images[name][i], images["plain"][i]) for i in images["plain"]]
        rows[name] = {
            "seconds_per_image": per_image,
            "speedup": plain / per_image,
            "psnr_db_min": min(closeness),
            "psnr_db_mean": float(np.mean([c for c in closeness if c != float("inf")] or [np.inf])),
            "settings": SETTINGS[family][name],
        }
        print(f"{family:<5} {name:<22} {per_image:6.3f} s/image  {plain / per_image:5.2f}x  "
              f"PSNR min {min(closeness):5.1f} dB", flush=True)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        for family in args.families:
            model = common.make_model(Path(tmp) / family, family, args.size)
            results[family] = measure_family(family, model, args)
    result = {
        "settings": {"size": args.size, "steps": args.steps, "images": args.images,
                     "rounds": args.rounds, "device": "cpu", "dtype": "float32"},
        "families": results,
        "bars": [
            common.bar(
                f"3. {name} ({family})",
                "speedup and PSNR against the plain image, same seed (no bar)",
                f"{row['speedup']:.2f}x, PSNR min {row['psnr_db_min']:.1f} dB",
                None,
            )
            for family, rows in results.items()
            for name, row in rows.items()
            if name != "plain"
        ],
    }
    path = common.write_result("levers", result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
