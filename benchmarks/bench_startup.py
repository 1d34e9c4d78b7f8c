"""How long the command lines take to answer ``--help`` (what a mistyped option costs too).

    python benchmarks/bench_startup.py [--rounds 7]

Each figure is the median wall time of a fresh interpreter over the rounds; rounds alternate
the commands (this machine's speed drifts). The baseline is the same interpreter importing
what ``fractalad``'s command line imported at start before it moved its choices into the
torch-free ``fractalad/choices.py``: torch, the model, training, evaluation and export modules,
and scikit-image. Prints one final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
COMMANDS = {
    "fractalad_help": ["-m", "fractalad", "--help"],
    "fractalsynth_help": ["-m", "fractalsynth", "--help"],
    "baseline_eager_imports": ["-c", "import fractalad.cli, fractalad.train, fractalad.evaluate, "
                                     "fractalad.export, skimage.morphology"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    seconds = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            t = time.perf_counter()
            subprocess.run([sys.executable, *cmd], env=env, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - t)
    med = {name: round(statistics.median(v), 3) for name, v in seconds.items()}
    print(json.dumps({"rounds": args.rounds, "median_seconds": med,
                      "fractalad_speedup": round(med["baseline_eager_imports"] / med["fractalad_help"], 2)}))


if __name__ == "__main__":
    main()
