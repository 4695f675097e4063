"""Kills tiny training runs with SIGKILL at seeded random moments, resumes each, and compares it with a straight run.

    python tests/support/kill_worker.py WORKDIR --kills 20 --seed 0 -- [run_pretrain flags]

The libraries are imported once; every run is a forked child process (`train(parse_args(flags))`), so a trial costs
the training itself, not the imports. First a straight run gives the reference (its final weights and its loss per
step) and its duration T; then each trial starts a run in its own folder, sends it `kill -9` after a delay drawn from
`random.Random(seed)` in (0, T) (every other trial in (T/2, T), where the steps and checkpoints are), resumes it with
`--resume_from_checkpoint latest` to the end, and compares, until `--kills` trials were killed before they finished
(at most twice as many trials; T shrinks by a fifth after each run that finished first, when the machine got less
loaded than during the straight run). One JSON line per trial: delay, whether the kill landed before the run
finished, what the kill left (checkpoints, a partial `.checkpoint-*.tmp`), whether the resumed run's final weights
are byte-identical and its losses equal, and its error output if it failed. The parent does no torch work, so
forking is safe.
"""

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from modeling_medclip.training import parse_args, train  # noqa: E402


def run_child(flags: list[str], log: Path) -> int:
    """Fork a process that trains with `flags` (stdout and stderr to `log`); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: train, then leave without running the parent's exit handlers
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            train(parse_args(flags))
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def fingerprint(output_dir: Path) -> dict:
    """What a run must reproduce: the bytes of its final weights and its training loss at each step."""
    losses = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            losses[entry["step"]] = entry["loss"]
    weights = hashlib.sha256((output_dir / "final" / "model.safetensors").read_bytes()).hexdigest()
    return {"weights": weights, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    own, flags = sys.argv[1:split], sys.argv[split + 1 :]
    args = parser.parse_args(own)
    args.workdir.mkdir(parents=True, exist_ok=True)

    straight_dir = args.workdir / "straight"
    start = time.monotonic()
    code = wait(run_child([*flags, "--output_dir", str(straight_dir)], args.workdir / "straight.log"))
    duration = time.monotonic() - start
    if code != 0:
        print(json.dumps({"straight_failed": (args.workdir / "straight.log").read_text()[-3000:]}), flush=True)
        sys.exit(1)
    reference = fingerprint(straight_dir)
    print(json.dumps({"straight_seconds": round(duration, 2), "steps": len(reference["losses"])}), flush=True)

    schedule = random.Random(args.seed)
    kills = 0
    for trial in range(2 * args.kills):
        if kills == args.kills:
            break
        output_dir = args.workdir / f"trial-{trial}"
        log = args.workdir / f"trial-{trial}.log"
        run_flags = [*flags, "--output_dir", str(output_dir)]
        # every other kill lands in the second half, where the steps and checkpoints are (start-up comes first)
        delay = schedule.uniform(0.02 if trial % 2 else 0.5, 0.98) * duration
        pid = run_child(run_flags, log)
        time.sleep(delay)
        finished_first = os.waitpid(pid, os.WNOHANG)[0] != 0
        if not finished_first:
            os.kill(pid, signal.SIGKILL)
            wait(pid)
            kills += 1
        else:  # the machine got faster than during the straight run: aim earlier from now on
            duration *= 0.8
        left = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
        code = wait(run_child([*run_flags, "--resume_from_checkpoint", "latest"], log))
        result = {"trial": trial, "delay": round(delay, 3), "killed": not finished_first, "left": left, "code": code}
        if code == 0:
            resumed = fingerprint(output_dir)
            result["weights_equal"] = resumed["weights"] == reference["weights"]
            result["losses_equal"] = resumed["losses"] == reference["losses"]
        else:
            result["log"] = log.read_text()[-3000:]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
