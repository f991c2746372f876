#!/usr/bin/env python3
"""Chaos run: a real training job under `grove up` while actors of every role
(rollout, verifier, replay, learner and the coordinator itself) are killed
with SIGKILL at random moments (seeded), then an audit of the run's own
records. Run by ctest with --short; by hand for longer (docs/operations.md).

What is checked at the end, and from which records:
  finished   `grove up` exited 0 and metrics.jsonl's last line is step == steps.
  acknowledged  A = every "GROUP_ID VERSION" line in RUN_DIR/acks/*.log: each
             rollout worker writes one when the store's InsertAck reached it
             (rollout.ack_log), so A is what the senders were told is durable.
  not lost   every id in A is in the replay store (replay_audit), or below
             the store's retention floor (retired, which only settled groups
             are). So each acknowledged group ends consumed, dropped as
             stale (a recorded verdict, and the coordinator hands its prompt
             out again), or still pending.
  at most once  C = the ids in RUN_DIR/consumed.jsonl (one line per
             acknowledged consume mark, with the ids of that batch). No id
             appears in two lines; every line marked all its groups new
             (newly_marked == len(groups), or a retried mark whose first try
             landed); metrics.jsonl's groups_reconsumed stays 0; every id in
             C is settled in the store. Marks whose line a learner kill cut
             off are bounded: store consumed - |C| <= batch_groups * learner kills.
             Groups trained after the last checkpoint before a learner kill
             are consumed but their update is lost with the process: that
             is the resume contract (docs/operations.md), not a double use.
  versions   metrics.jsonl's GRPO lines have strictly increasing versions;
             every rollout worker's reported policy version (polled from
             `grove status --json`) never goes down within one process and
             never exceeds the learner's.
  accuracy   the final held-out accuracy (greedy, n = learner.eval_problems)
             is within 3 standard errors of the difference of two binomial
             estimates, plus a 0.02 margin, of an undisturbed run with the
             same seed: |a - b| <= 3 * sqrt(2 p (1 - p) / n) + 0.02,
             p = (a + b) / 2. --short compares with a stored expectation
             (expected_short.json, written by --record); the long mode runs
             the undisturbed reference itself first.
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROLES = ["rollout", "verifier", "replay", "learner", "coordinator"]


def log(msg):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_jsonl(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill
    except FileNotFoundError:
        pass
    return rows


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Run:
    """One `grove up` in the foreground, with its run directory."""

    def __init__(self, args, name, overrides, runs_dir):
        self.args = args
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.up_log = self.runs_dir / "up.log"
        cmd = [args.grove, "up", "--config", args.config, "--runs_dir", str(self.runs_dir), "--name", name]
        for o in overrides:
            cmd += ["--set", o]
        self.cmd = cmd
        self.proc = None
        self.run_dir = None
        self.ended = None  # when grove up exited

    def start(self):
        log("start: " + " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.up_log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def find_run_dir(self):
        if self.run_dir is None:
            for d in self.runs_dir.iterdir():
                if d.is_dir() and not d.is_symlink() and (d / "cluster.json").exists():
                    self.run_dir = d
        return self.run_dir

    def cluster(self):
        d = self.find_run_dir()
        return read_json(d / "cluster.json") if d else None

    def metrics(self):
        d = self.find_run_dir()
        return read_jsonl(d / "metrics.jsonl") if d else []

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """Tears down whatever is left (only on failure paths)."""
        if not self.alive():
            return
        info = self.cluster() or {}
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in (info.get("pids") or {}).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class StatusPoller(threading.Thread):
    """Polls `grove status --json` and keeps every actor's reported policy
    version per process (role, id, pid)."""

    def __init__(self, grove, run):
        super().__init__(daemon=True)
        self.grove, self.cluster_run = grove, run
        self.versions = {}  # (role, id, pid) -> [versions in poll order]
        self.polls = self.failed = 0
        self.done = threading.Event()

    def run_once(self):
        d = self.cluster_run.find_run_dir()
        if d is None:
            return
        try:
            out = subprocess.run([self.grove, "status", "--json", "--run_dir", str(d)], capture_output=True,
                                 text=True, timeout=10)
            status = json.loads(out.stdout) if out.returncode == 0 else None
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            status = None
        if status is None:
            self.failed += 1  # the coordinator may be down right now
            return
        self.polls += 1
        for a in status.get("actors", []):
            v = a.get("policy_version")
            if v is None or a.get("state") not in ("healthy", "suspect", "starting"):
                continue
            self.versions.setdefault((a.get("role"), a.get("id"), a.get("pid")), []).append(int(v))

    def run(self):
        while not self.done.wait(1.0):
            self.run_once()


def wait_for(pred, timeout, what, run):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        if not run.alive():
            raise RuntimeError(f"grove up exited (rc {run.proc.returncode}) while waiting for {what}; see {run.up_log}")
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def pick_victim(rng, role, cluster):
    pids = cluster.get("pids") or {}
    ids = sorted(i for i in pids if (i == "coordinator" if role == "coordinator" else i.startswith(role + "-")))
    if not ids:
        return None, None
    i = rng.choice(ids)
    return i, pids[i]


def chaos(run, args, rng, deadline_s):
    """Kills until args.kills are done (or the learner finished). Returns the
    kill records."""
    kills = []
    # Every role once (shuffled), then roles at random.
    order = ROLES[:]
    rng.shuffle(order)
    while len(kills) < args.kills and run.alive():
        delay = rng.uniform(args.min_gap, args.max_gap)
        t_end = time.time() + delay
        while time.time() < t_end and run.alive():
            time.sleep(0.05)
        if not run.alive():
            break
        rows = run.metrics()
        if rows and rows[-1].get("step", 0) >= args.steps:
            break  # finished: nothing left to disturb
        if time.time() > deadline_s:
            break
        role = order[len(kills)] if len(kills) < len(order) else rng.choice(ROLES)
        info = run.cluster() or {}
        vid, pid = pick_victim(rng, role, info)
        if pid is None:
            continue  # that role is between a crash and its restart right now
        step = rows[-1].get("step", -1) if rows else -1
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills.append({"t": time.time(), "role": role, "id": vid, "pid": pid, "step": step})
        log(f"SIGKILL {vid} (pid {pid}) at learner step {step}")
    return kills


def audit(run, args, kills, poller):
    """Checks the run's records; returns (failures, summary)."""
    failures = []
    d = run.run_dir
    rows = read_jsonl(d / "metrics.jsonl")
    grpo = [r for r in rows if r.get("phase") == "grpo"]
    if not grpo or grpo[-1].get("step") != args.steps:
        failures.append(f"the run did not finish its {args.steps} steps (last: {grpo[-1] if grpo else None})")
    # Versions only go up; nothing reconsumed.
    last_v = -1
    for r in rows:
        v = r.get("version", -1)
        if r.get("phase") == "grpo":
            if v <= last_v:
                failures.append(f"learner version went {last_v} -> {v} at step {r.get('step')}")
            if r.get("groups_reconsumed", -1) != 0:
                failures.append(f"groups_reconsumed {r.get('groups_reconsumed')} at step {r.get('step')}")
        last_v = max(last_v, v)
    learner_max = last_v
    for (role, aid, pid), vs in poller.versions.items():
        if role != "rollout":
            continue
        for a, b in zip(vs, vs[1:]):
            if b < a:
                failures.append(f"{aid} (pid {pid}) reported policy version {a} then {b}")
                break
        if vs and max(vs) > learner_max:
            failures.append(f"{aid} reported version {max(vs)} above the learner's {learner_max}")

    # Acknowledged groups.
    acked = {}
    for f in sorted((d / "acks").glob("*.log")):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                acked[parts[0]] = int(parts[1])
    # Consumed groups, per acknowledged mark.
    consumed_lines = read_jsonl(d / "consumed.jsonl")
    consumed = {}
    for line in consumed_lines:
        ids = line.get("groups", [])
        for g in ids:
            if g in consumed:
                failures.append(f"group {g} consumed twice: steps {consumed[g]} and {line.get('step')}")
            consumed[g] = line.get("step")
        if line.get("newly_marked") != len(ids) and line.get("attempt", 0) == 0:
            failures.append(f"the mark at step {line.get('step')} found {len(ids) - line.get('newly_marked', 0)} "
                            f"of its {len(ids)} groups already consumed")
    # The store's view.
    ids_in = "".join(f"{g}\n" for g in sorted(set(acked) | set(consumed)))
    out = subprocess.run([args.audit, str(d / "replay")], input=ids_in, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        failures.append(f"replay_audit failed: {out.stderr.strip()}")
        return failures, {}
    store = json.loads(out.stdout)
    floor = store["counters"]["retention_floor"]
    missing = set(store["missing"])
    unsettled = set(store["unsettled"])
    lost = [g for g in missing if g in acked and acked[g] >= floor]
    if lost:
        failures.append(f"{len(lost)} acknowledged groups are not in the store, e.g. {sorted(lost)[:5]}")
    for g in consumed:
        if g in unsettled:
            failures.append(f"group {g} was marked consumed but the store holds it unsettled")
            break
        if g in missing and (g not in acked or acked[g] >= floor):
            failures.append(f"consumed group {g} is not in the store")
            break
    learner_kills = sum(1 for k in kills if k["role"] == "learner")
    unlogged = store["counters"]["consumed"] - len(consumed)
    if unlogged < 0 or unlogged > args.batch_groups * learner_kills:
        failures.append(f"the store counts {store['counters']['consumed']} consumed, consumed.jsonl {len(consumed)}: "
                        f"{unlogged} unaccounted with {learner_kills} learner kills")
    pending = [g for g in acked if g in unsettled]
    acked_consumed = sum(1 for g in acked if g in consumed)
    settled_other = len(acked) - acked_consumed - len(pending) - len(lost)

    # Restarts the launcher made.
    started = {}
    for line in run.up_log.read_text(errors="replace").splitlines():
        m = re.search(r"started (\S+) pid \d+ \(restarts (\d+)", line)
        if m:
            started[m.group(1)] = max(started.get(m.group(1), 0), int(m.group(2)))
    kills_per_role = {r: sum(1 for k in kills if k["role"] == r) for r in ROLES}
    # Every killed actor was started again (the launcher's restart path),
    # but for kills in the last seconds, when the run may be shutting down.
    settled_kills = [k for k in kills if run.ended is None or k["t"] < run.ended - 5]
    for vid in sorted({k["id"] for k in settled_kills}):
        n = sum(1 for k in settled_kills if k["id"] == vid)
        if started.get(vid, 0) < n:
            failures.append(f"{vid} was killed {n} times but restarted {started.get(vid, 0)} times")
    learner_log = d / "logs" / "learner-0.log"
    resumes = learner_log.read_text(errors="replace").count("resumed from") if learner_log.exists() else 0
    if resumes < sum(1 for k in settled_kills if k["role"] == "learner"):
        failures.append(f"the learner was killed {kills_per_role['learner']} times but resumed {resumes} times")
    final = grpo[-1] if grpo else {}
    summary = {
        "kills": len(kills),
        "kills_per_role": kills_per_role,
        "restarts": {i: n for i, n in sorted(started.items()) if n > 0},
        "restarts_total": sum(started.values()),
        "groups_acknowledged": len(acked),
        "groups_trained_logged": len(consumed),
        "groups_reconsumed": max([r.get("groups_reconsumed", 0) for r in grpo] or [0]),
        "store": store["counters"],
        "acknowledged_consumed": acked_consumed,
        "acknowledged_pending": len(pending),
        "acknowledged_dropped_or_unlogged": settled_other,
        "acknowledged_lost": len(lost),
        "unlogged_marks": unlogged,
        "learner_resumes": resumes,
        "learner_steps": final.get("step"),
        "learner_version": learner_max,
        "rollout_processes_polled": sum(1 for k in poller.versions if k[0] == "rollout"),
        "rollout_version_max": max([max(v) for k, v in poller.versions.items() if k[0] == "rollout" and v] or [-1]),
        "status_polls": poller.polls,
        "status_polls_failed": poller.failed,
        "final_accuracy": final.get("eval_accuracy"),
        "warmstart_accuracy": rows[0].get("eval_accuracy") if rows else None,
    }
    return failures, summary


def within_noise(a, b, n):
    p = min(max((a + b) / 2, 1.0 / n), 1 - 1.0 / n)
    bound = 3 * math.sqrt(2 * p * (1 - p) / n) + 0.02
    return abs(a - b) <= bound, bound


def overrides(args):
    o = [f"learner.steps={args.steps}", "learner.eval_every=0", f"learner.eval_problems={args.eval_problems}",
         f"learner.batch_groups={args.batch_groups}", f"coordinator.prompts_per_step={args.batch_groups}",
         f"learner.checkpoint_every={args.checkpoint_every}", "rollout.ack_log=true",
         f"launcher.restart_limit={args.restart_limit}", f"launcher.restart_backoff_ms={args.restart_backoff_ms}",
         f"launcher.restart_reset_ms={args.restart_reset_ms}"]
    return o + args.set


def undisturbed(args, work):
    run = Run(args, "reference", overrides(args), work / "reference")
    run.start()
    try:
        rc = run.proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        run.stop()
        raise RuntimeError("the undisturbed reference run timed out")
    rows = run.metrics()
    if rc != 0 or not rows or rows[-1].get("step") != args.steps:
        raise RuntimeError(f"the undisturbed reference run failed (rc {rc}); see {run.up_log}")
    return rows[-1]["eval_accuracy"], rows[-1].get("time_s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grove", required=True, help="the grove binary")
    ap.add_argument("--audit", required=True, help="the replay_audit binary")
    ap.add_argument("--config", default=str(HERE.parent.parent / "configs" / "smoke.toml"))
    ap.add_argument("--short", action="store_true", help="the suite's variant: few steps and kills, stored reference")
    ap.add_argument("--seed", type=int, default=11, help="seeds the kill schedule")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--min_gap", type=float, default=10.0, help="seconds between kills, at least")
    ap.add_argument("--max_gap", type=float, default=40.0)
    ap.add_argument("--batch_groups", type=int, default=16)
    ap.add_argument("--checkpoint_every", type=int, default=5)
    ap.add_argument("--eval_problems", type=int, default=256)
    ap.add_argument("--restart_limit", type=int, default=1000)
    ap.add_argument("--restart_backoff_ms", type=int, default=50)
    # Kills come from outside, seconds apart: not a crash loop to back off from.
    ap.add_argument("--restart_reset_ms", type=int, default=2000)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds for one run")
    ap.add_argument("--reference", choices=["run", "stored", "skip"], default=None,
                    help="undisturbed run to compare with (default: run; --short: stored)")
    ap.add_argument("--record", action="store_true", help="run undisturbed and store the expectation for --short")
    ap.add_argument("--work", default=None, help="working directory (default: a fresh temporary one, removed on success)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    ap.add_argument("--set", action="append", default=[], help="extra config override a.b=V")
    args = ap.parse_args()
    if args.short:
        args.steps, args.kills, args.min_gap, args.max_gap = 16, 6, 4.0, 9.0
        args.eval_problems, args.timeout = 256, 420
        args.reference = args.reference or "stored"
    args.reference = args.reference or "run"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="grove_chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    expected_file = HERE / "expected_short.json"
    t0 = time.time()

    if args.record:
        acc, secs = undisturbed(args, work)
        json.dump({"accuracy": acc, "steps": args.steps, "eval_problems": args.eval_problems,
                   "batch_groups": args.batch_groups, "seconds": secs}, open(expected_file, "w"), indent=1)
        log(f"recorded undisturbed accuracy {acc} in {expected_file}")
        return 0

    reference = None
    if args.reference == "run":
        reference, secs = undisturbed(args, work)
        log(f"undisturbed run: accuracy {reference} ({secs:.0f} s)")
    elif args.reference == "stored":
        exp = read_json(expected_file)
        if exp and exp.get("steps") == args.steps and exp.get("eval_problems") == args.eval_problems:
            reference = exp["accuracy"]
        else:
            log(f"no stored expectation for {args.steps} steps in {expected_file}: accuracy not compared")

    rng = random.Random(args.seed)
    run = Run(args, "chaos", overrides(args), work / "chaos")
    poller = StatusPoller(args.grove, run)
    failures = []
    kills = []
    try:
        run.start()
        wait_for(lambda: run.cluster() is not None, 60, "cluster.json", run)
        poller.start()
        # Kills begin once the warm-start is done (a learner killed during
        # it starts over from nothing: it costs time, not correctness).
        wait_for(lambda: any(r.get("phase") == "warmstart" for r in run.metrics()), args.timeout, "the warm-start", run)
        log("warm-start done; chaos begins")
        kills = chaos(run, args, rng, time.time() + args.timeout)
        try:
            rc = run.proc.wait(timeout=max(10, args.timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            rc = None
        run.ended = time.time()
        if rc != 0:
            rows = run.metrics()
            failures.append(f"grove up did not finish cleanly (rc {rc}, last step "
                            f"{rows[-1].get('step') if rows else None}); see {run.up_log}")
    except RuntimeError as e:
        failures.append(str(e))
    finally:
        poller.done.set()
        run.stop()
    summary = {}
    if run.run_dir is not None and (run.run_dir / "replay").exists():
        f2, summary = audit(run, args, kills, poller)
        failures += f2
    acc = summary.get("final_accuracy")
    if reference is not None and acc is not None:
        ok, bound = within_noise(acc, reference, args.eval_problems)
        summary["reference_accuracy"] = reference
        summary["accuracy_bound"] = round(bound, 4)
        if not ok:
            failures.append(f"final accuracy {acc} vs undisturbed {reference}: |diff| > {bound:.3f}")
    summary["seconds"] = round(time.time() - t0, 1)
    summary["run_dir"] = str(run.run_dir)
    print("chaos summary: " + json.dumps(summary, indent=1), flush=True)
    with open(work / "summary.json", "w") as f:
        json.dump({"summary": summary, "kills": kills, "failures": failures}, f, indent=1)
    if failures:
        for f in failures:
            print("FAIL: " + f, flush=True)
        print(f"records kept in {work}", flush=True)
        return 1
    log(f"all checks passed ({len(kills)} kills, {summary['seconds']} s)")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
