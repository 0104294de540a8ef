"""Time the original Renaissance code and this project side by side: peer, ours, peer, ours, ... in one run.

    python scripts/bench_vs_original.py --peer_dir=$PEER_DIR --peer_site=$PEER_SITE --rounds=3 --freeze=none,both

Set the peer up first (PEER_DIR and PEER_SITE come from its setup.sh; the timing instrument and its README are in
the folder --peer_step points into). Each round runs, for every --freeze value in turn, the original's step.py
and then bench.py on the same settings: the paper's two-tower model at its exact sizes from random init, random
data, image 224, --text_len text tokens, batch --batch, float32, --threads threads in both processes. bench.py
measures the variant of the same name (none, text, vision, both), and in each round's last bench.py run the
variants of --extra_variants after it. Interleaving spreads the load other processes put on the machine over
both sides. Each figure (samples/s) is printed as it comes, with the load average, then per side its median and
min-max; --json keeps everything. The project never needs the peer: nothing else imports or runs this script.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FREEZE_VALUES = ("none", "text", "vision", "both")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench_vs_original.py", description="see the module docstring")
    parser.add_argument("--peer_dir", required=True, help="the exported original code (setup.sh's PEER_DIR)")
    parser.add_argument("--peer_site", required=True, help="its transformers 4.x site (setup.sh's PEER_SITE)")
    parser.add_argument("--peer_step", default="/work/shared/tools/peer/step.py", help="the peer's step.py")
    parser.add_argument("--config", default="configs/freeze_none.py")
    parser.add_argument("--freeze", default="none,both", help=f"comma-separated, each of {', '.join(FREEZE_VALUES)}")
    parser.add_argument("--extra_variants", default="", help="bench.py variants without a peer counterpart (e.g. "
                                                             "none+shared), measured each round after the last pair")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text_len", type=int, default=40)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one timing may take")
    parser.add_argument("--json", default="", help="where the figures go (default: none written)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    args.freeze = args.freeze.split(",")
    args.extra_variants = [v for v in args.extra_variants.split(",") if v]
    bad = [f for f in args.freeze if f not in FREEZE_VALUES]
    if bad or args.rounds < 1 or args.steps < 1:
        parser.error(f"--freeze takes {', '.join(FREEZE_VALUES)} (got {bad}); --rounds and --steps at least 1")
    return args


def run(command, env, timeout):
    """stdout of `command`; a failure raises with the end of its stderr."""
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{tail}")
    return done.stdout


def parse_peer_output(stdout):
    """samples/s from step.py's output: its last line that is a JSON object with samples_per_s (warnings from
    the old transformers may come before it)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            if "samples_per_s" in record:
                return float(record["samples_per_s"])
    raise ValueError(f"no JSON line with samples_per_s in the peer's output:\n{stdout[-500:]}")


def peer_command(args, freeze):
    return [args.python, args.peer_step, args.peer_dir, "--batch", str(args.batch), "--steps", str(args.steps),
            "--freeze", freeze, "--threads", str(args.threads), "--image", str(args.image),
            "--text_len", str(args.text_len)]


def ours_command(args, variants, json_path):
    return [args.python, os.path.join(ROOT, "bench.py"), args.config, "--random_init_towers=true", "--data=random",
            "--dtype=float32", f"--image_size={args.image}", f"--max_text_len={args.text_len}",
            f"--micro_batch_size={args.batch}", f"--batch_size={args.batch}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--variants={','.join(variants)}", f"--json={json_path}"]


def summarise(figures):
    """{label: [samples/s, ...]} -> lines: each label's figures, median and min-max, in first-seen order."""
    lines = []
    for label, values in figures.items():
        listed = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"{label:<22} {listed:<40} median {statistics.median(values):.2f}  "
                     f"min-max {min(values):.2f}-{max(values):.2f}")
    return lines


def main(argv):
    args = parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    peer_env = dict(env, PYTHONPATH=args.peer_site)
    ours_env = dict(env, PYTHONPATH=ROOT)  # the project's own transformers, never the peer's site
    figures, runs = {}, []
    print(f"peer {args.peer_dir} | ours {args.config} | batch {args.batch} | image {args.image} | text "
          f"{args.text_len} | float32 | {args.threads} threads | {args.warmup} warm-up + {args.steps} timed steps "
          f"(each figure a median over steps) | {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for freeze in args.freeze:
                load = os.getloadavg()[0]
                value = parse_peer_output(run(peer_command(args, freeze), peer_env, args.timeout))
                entries = [(f"original {freeze}", value, load, {})]
                load = os.getloadavg()[0]
                variants = [freeze] + (args.extra_variants if freeze == args.freeze[-1] else [])
                json_path = os.path.join(tmp, f"{round_index}-{freeze}.json")
                run(ours_command(args, variants, json_path), ours_env, args.timeout)
                with open(json_path) as f:
                    rows = json.load(f)["variants"]
                entries += [(f"ours {row['variant']}", row["samples_per_sec"], row["load_average"],
                             {"mfu": row["mfu"], "flops_per_sample": row["flops_per_sample"]}) for row in rows]
                for label, value, load, extra in entries:
                    figures.setdefault(label, []).append(value)
                    runs.append({"round": round_index, "label": label, "samples_per_sec": value, "load": load,
                                 **extra})
                    mfu = f"  MFU {100 * extra['mfu']:.1f}%" if extra else ""
                    print(f"round {round_index + 1}  {label:<22} {value:6.2f} samples/s{mfu}  (load {load:.2f})",
                          flush=True)
    print("\n".join(summarise(figures)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": argv, "runs": runs, "figures": figures}, f, indent=2)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
