#!/usr/bin/env python3
"""Acceptance run with an outside producer, as a user would do it.

Starts `mlsched dev --keep-running` from BIN_DIR, publishes thousands of envelopes with
Python's nats-py (valid jobs, duplicates of them, malformed bodies), kills one executor
with SIGKILL mid-run, and then checks that every valid job ended `succeeded` exactly
once in Postgres and that every malformed body is in JOBS_DEAD with its reason.

Usage: scripts/acceptance.sh [BIN_DIR]   (sets up nats-py; see that script)
"""

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import nats

MALFORMED = [
    (b"this is not json", "not a JSON object"),
    (b"", "body is empty"),
    (b"\xff\xfe\xfd", "not UTF-8"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"payload": {}}', "missing required field `kind`"),
    (b'{"kind": "sleep"}', "missing required field `payload`"),
    (b'{"kind": "cpu", "payload": {}}', "subject says"),
    (b'{"kind": "sleep", "payload": {}, "id": "not-a-uuid"}', "field `id`"),
    (b'{"kind": "sleep", "payload": {}, "max_attempts": 0}', "field `max_attempts`"),
    (b'{"kind": "sleep", "payload": {}, "timeout_ms": "soon"}', "field `timeout_ms`"),
]


def psql(url, sql):
    out = subprocess.run(["psql", url, "-XAtc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def wait_for(what, timeout, check):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    sys.exit(f"FAIL: timed out after {timeout}s waiting for {what}")


async def publish(url, jobs, duplicates, malformed_rounds):
    nc = await nats.connect(url)
    js = nc.jetstream()
    ids = []
    pending = []
    for i in range(jobs):
        job_id = str(uuid.uuid4())
        kind, payload = ("sleep", {"ms": 50 + i % 100}) if i % 4 else ("noop", {"i": i})
        body = json.dumps({"id": job_id, "kind": kind, "payload": payload}).encode()
        ids.append((job_id, kind, body))
        pending.append(js.publish(f"jobs.submit.{kind}", body, headers={"Nats-Msg-Id": job_id}))
        if len(pending) >= 256:
            await asyncio.gather(*pending)
            pending = []
    # Duplicates: the same envelope again, with and without its Msg-Id.
    for n, (job_id, kind, body) in enumerate(ids[:duplicates]):
        headers = {"Nats-Msg-Id": job_id} if n % 2 else None
        pending.append(js.publish(f"jobs.submit.{kind}", body, headers=headers))
    sent_malformed = []
    for r in range(malformed_rounds):
        for body, reason in MALFORMED:
            # A marker header tells the copies apart; it travels to the dead letter.
            marker = f"{r}-{len(sent_malformed)}"
            pending.append(js.publish("jobs.submit.sleep", body, headers={"X-Case": marker}))
            sent_malformed.append((marker, body, reason))
    await asyncio.gather(*pending)
    await nc.close()
    return ids, sent_malformed


async def dead_letters(url):
    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info("JOBS_DEAD")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            m = await js.get_msg("JOBS_DEAD", seq)
        except Exception:
            continue
        out.append(m)
    await nc.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--duplicates", type=int, default=500)
    ap.add_argument("--malformed-rounds", type=int, default=5)
    args = ap.parse_args()

    data = tempfile.mkdtemp(prefix="mlsched-acceptance-")
    os.chmod(data, 0o755)  # as root, Postgres runs as `postgres` and must reach it
    log_path = os.path.join(data, "dev.log")
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    dev = subprocess.Popen(
        [os.path.join(args.bin_dir, "mlsched"), "dev", "--jobs", "0", "--keep-running",
         "--data-dir", os.path.join(data, "stack")],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        def started():
            text = open(log_path).read()
            if dev.poll() is not None:
                sys.exit(f"FAIL: mlsched dev exited early:\n{text}")
            return text if "workers " in text else None
        text = wait_for("mlsched dev to start", 120, started)
        nats_url = re.search(r"nats-server\s+(nats://\S+)", text).group(1)
        db_url = re.search(r"postgres\s+(postgres://\S+)", text).group(1)
        victim = int(re.search(r"executor-1 \(pid (\d+)\)", text).group(1))
        print(f"stack up: {nats_url}  {db_url}  (will kill -9 executor-1, pid {victim})")

        t0 = time.time()
        ids, malformed = asyncio.run(publish(nats_url, args.jobs, args.duplicates, args.malformed_rounds))
        print(f"published {len(ids)} jobs + {args.duplicates} duplicates + {len(malformed)} malformed bodies "
              f"in {time.time() - t0:.1f}s with nats-py")

        target = len(ids) // 5
        wait_for(f"{target} jobs to succeed", 300,
                 lambda: int(psql(db_url, "SELECT count(*) FROM jobs WHERE status = 'succeeded'")) >= target)
        running = psql(db_url, "SELECT count(*) FROM jobs WHERE status = 'running'")
        os.kill(victim, signal.SIGKILL)
        print(f"killed executor-1 with SIGKILL while {running} jobs were running")

        def all_done():
            n = int(psql(db_url, "SELECT count(*) FROM jobs WHERE status IN ('succeeded','dead','cancelled')"))
            return n >= len(ids)
        wait_for("every job to finish", 600, all_done)
        elapsed = time.time() - t0

        rows = int(psql(db_url, "SELECT count(*) FROM jobs"))
        succeeded = int(psql(db_url, "SELECT count(*) FROM jobs WHERE status = 'succeeded'"))
        twice = int(psql(db_url, "SELECT count(*) FROM (SELECT job_id FROM job_events WHERE status = 'succeeded' "
                                 "GROUP BY job_id HAVING count(*) > 1) t"))
        rerun = int(psql(db_url, "SELECT count(*) FROM jobs WHERE attempts > 1"))
        expected = {i for i, _, _ in ids}
        found = set(psql(db_url, "SELECT id FROM jobs").split())
        print(f"rows {rows}, succeeded {succeeded}, succeeded twice {twice}, re-run after the kill {rerun}, "
              f"{elapsed:.1f}s from first publish to last finish")
        ok = rows == len(ids) and succeeded == len(ids) and twice == 0 and found == expected

        dead = asyncio.run(dead_letters(nats_url))
        by_case = {m.headers.get("X-Case"): m for m in dead if m.headers and m.headers.get("X-Case")}
        missing = []
        for marker, body, reason in malformed:
            m = by_case.get(marker)
            if m is None or (m.data or b"") != body or reason not in m.headers.get("Mlsched-Error", ""):
                missing.append((marker, body, reason, m and m.headers.get("Mlsched-Error")))
        print(f"dead letters: {len(dead)} in JOBS_DEAD; {len(malformed) - len(missing)} of {len(malformed)} "
              f"malformed bodies found with the expected reason")
        for case in missing[:5]:
            print("  missing or wrong:", case)
        if dead:
            print("  e.g.", dead[0].headers.get("Mlsched-Error"))
        ok = ok and not missing and len(dead) == len(malformed)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dev.kill()


if __name__ == "__main__":
    sys.exit(main())
