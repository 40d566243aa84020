"""Run every benchmark in bench/ (bench_*.py) and print a Markdown table of bench/results/*.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = 0
    for script in sorted(HERE.glob("bench_*.py")):
        if script.name == "bench_gpu.py":  # needs a CUDA device and a prepared dataset: run it by hand
            continue
        print(f"== {script.name}", flush=True)
        failed += subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode != 0
    print("\n| benchmark | figure | value |\n|---|---|---|")
    for path in sorted((HERE / "results").glob("*.json")):
        data = json.loads(path.read_text())
        for k, v in data.items():
            if k not in ("benchmark", "machine", "notes") and not isinstance(v, (dict, list)):
                print(f"| {data['benchmark']} | {k} | {v} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
