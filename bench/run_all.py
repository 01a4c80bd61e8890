"""Run every bench/bench_*.py in turn as `python -m bench.NAME` (what `make bench` does). Run
nothing else meanwhile."""

import subprocess
import sys
from pathlib import Path


def main() -> None:
    here = Path(__file__).resolve().parent
    failed = []
    for script in sorted(here.glob("bench_*.py")):
        print(f"\n## {script.name}\n", flush=True)
        command = [sys.executable, "-m", f"bench.{script.stem}"]
        if subprocess.run(command, cwd=here.parent, check=False).returncode != 0:
            failed.append(script.name)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
