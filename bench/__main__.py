"""`python -m bench`: the engine's benchmark suite, side by side in one run.

Starts its own servers on 127.0.0.1, measures (a)-(h), prints a table of ratios and writes it
to docs/benchmarks.md with the machine and date. `--quick` runs fewer repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys

import jax

from bench import cases, limits, sessions
from bench.harness import ROOT, Server, Table


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, jax {jax.__version__}, {jax.default_backend()}"


def gpu_note() -> str:
    """Rows k and l run on whatever JAX's default backend is: say which, and what is missing."""
    if jax.default_backend() == "gpu":
        return f"Rows k and l ran on the GPU: {jax.devices()[0].device_kind}."
    return (
        "No GPU on this machine: rows k and l (the 1M VJP and batching) ran on the CPU, and no "
        "GPU run is recorded. On a GPU machine, `python -m bench --only kl` measures them there."
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier)")
    parser.add_argument("--only", default="abcdefghjkl", help="which cases, e.g. 'ac'")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    reps = lambda n: max(3, int(n * scale))  # noqa: E731

    table = Table()
    print(f"gradserve benchmarks on {machine()}", flush=True)
    with Server() as main_server:
        if "a" in args.only:
            cases.roundtrip(table, main_server, reps(2000))
        if "b" in args.only:
            cases.throughput(table, main_server, max(2, int(5 * scale)))
        if "c" in args.only:
            cases.transfer(table, main_server, reps(30))
        if "e" in args.only:
            cases.remote_vs_local(table, main_server, reps(60))
        if "f" in args.only:
            cases.hvp_vs_grad(table, main_server, reps(10))
        if "d" in args.only:
            with Server(GRADSERVE_MAX_BATCH_SIZE="1") as unbatched:
                cases.batching(table, main_server, unbatched, reps(20))
    if "g" in args.only:
        cases.restart(table)
    if "h" in args.only:
        sessions.run(table, reps)
    if "j" in args.only:
        cases.healthz_during_json(table, max(2, int(5 * scale)))
    if "k" in args.only:
        limits.transfer_floor(table, reps(30))
    if "l" in args.only:
        limits.batching(table, reps(10))

    report = table.markdown()
    print()
    print(report)
    if not args.no_write:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        path = ROOT / "docs" / "benchmarks.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            f"# Benchmarks\n\n`python -m bench` on {machine()}, {stamp}.\n"
            "Client and server share the machine; each ratio is measured side by side in one run.\n\n"
            f"{report}\n\n{gpu_note()}\n\n"
            "Where the time goes in the missed targets: [profile.md](profile.md).\n"
        )
        print(f"\nwritten to {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
