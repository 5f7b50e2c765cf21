#!/usr/bin/env python3
"""make bench: rotation throughput and memory, measured side by side in one run.

Everything runs on this machine against a private PostgreSQL with default (durable)
settings, started here:

* **engine**: online and atomic rotations of N rows x P-byte plaintexts, each in its own
  child process (so peak RSS is the rotating process's, workers included);
* **floor**: PostgreSQL alone rewriting the same rows, ``UPDATE t SET key_id = key_id``;
* **ceiling**: AES-GCM decrypt + encrypt of the same values in one Python process, no DB;
* **naive**: SELECT everything, then one UPDATE per row (100k rows, extrapolated);
* **app library**: warm ``Encryptor.encrypt`` / ``decrypt`` ops/s;
* **operator latency**: ``kubectl patch`` of spec.version to ``Rotating=True`` and to
  ``Ready=True`` with observedVersion updated, on the real control plane.

Each figure is the min and median of ``--repeat`` runs.  Prints a table, then one line of
JSON with every figure (for scripts).  Benchmarks, not tests: nothing here asserts a target.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack" / "testenv"))

import psycopg  # noqa: E402

from rotation_operator import crypto  # noqa: E402
from rotation_operator.config import RotationOptions, StoreConfig, Target  # noqa: E402
from rotation_operator.keystore import KeyStore  # noqa: E402

KEK = bytes(range(32))
CFG = StoreConfig([Target("secrets")])


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


# -- data -------------------------------------------------------------------------------
def load(dsn: str, rows: int, size: int) -> None:
    """A fresh ``secrets`` table with ``rows`` legacy rows of ``size``-byte plaintexts."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS secrets, encryption_keys, encryption_keys_audit, "
                  "encryption_keys_rotations")
        c.execute("CREATE TABLE secrets (id bigint PRIMARY KEY, value bytea NOT NULL, "
                  "key_id integer)")
        with c.cursor().copy("COPY secrets (id, value) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int8", "bytea"])
            chunk = 100_000
            for start in range(1, rows + 1, chunk):
                n = min(chunk, rows + 1 - start)
                blob = os.urandom(size * n)
                for i in range(n):
                    cp.write_row((start + i, crypto.encrypt(KEK, blob[i * size:(i + 1) * size])))
        c.execute("VACUUM (ANALYZE) secrets")
    from rotation_operator.engine import Engine

    Engine(dsn, CFG, KEK, actor="bench").initialise()  # key v1; rows stay legacy


def table_mb(dsn: str) -> float:
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT pg_total_relation_size('secrets')").fetchone()
        return (row[0] if row else 0) / 1e6


def vacuum(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("VACUUM (ANALYZE) secrets")


def floor(dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        t = time.perf_counter()
        c.execute("UPDATE secrets SET key_id = key_id")
        return time.perf_counter() - t


# -- engine (child process) -------------------------------------------------------------
def rotate_child(dsn: str, mode: str, workers: int, batch: int, grace: float
                 ) -> dict[str, Any]:
    """Run one rotation in a fresh process; returns its seconds, rows and peak RSS."""
    out = subprocess.run(
        [sys.executable, __file__, "_rotate", mode, str(workers), str(batch), str(grace)],
        env={**os.environ, "BENCH_DSN": dsn}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rotate_main(mode: str, workers: int, batch: int, grace: float) -> None:
    from rotation_operator.engine import Engine

    engine = Engine(os.environ["BENCH_DSN"], CFG, KEK, actor="bench")
    engine.initialise()
    options = RotationOptions(mode=mode, batch_size=batch, vacuum=False,  # type: ignore[arg-type]
                              workers=workers, grace=grace)
    res = engine.rotate(None, options)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would report
    # the benchmark's own (large) footprint at the time it started this child.
    own = _vm_hwm_mb()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # workers
    print(json.dumps({"seconds": res.seconds, "rows": res.re_encrypted,
                      "rss_mb": max(own, kids), "rss_parent_mb": own, "rss_worker_mb": kids}))


# -- ceiling, naive, library ------------------------------------------------------------
def ceiling(dsn: str) -> float:
    """rows/s of decrypt+encrypt in one process over the table's current values."""
    with psycopg.connect(dsn) as c:
        ring = KeyStore(CFG).load_ring(c, KEK)
        rows = c.cursor(binary=True).execute("SELECT value, key_id FROM secrets").fetchall()
        values, key_ids = [bytes(r[0]) for r in rows], [r[1] for r in rows]
    t = time.perf_counter()
    for i in range(0, len(rows), 5000):
        ring.rotate_many(values[i:i + 5000], key_ids[i:i + 5000])
    return len(rows) / (time.perf_counter() - t)


def naive(dsn: str, limit: int) -> float:
    """rows/s of the textbook loop: SELECT all, then one UPDATE per row, one commit."""
    with psycopg.connect(dsn) as c:
        ring = KeyStore(CFG).load_ring(c, KEK)
        t = time.perf_counter()
        rows = c.execute("SELECT id, value, key_id FROM secrets ORDER BY id LIMIT %s",
                         (limit,)).fetchall()
        for row_id, value, key_id in rows:
            c.execute("UPDATE secrets SET value = %s, key_id = %s WHERE id = %s",
                      (ring.rotate(value, key_id), ring.active_version, row_id))
        c.commit()
        return len(rows) / (time.perf_counter() - t)


def library(dsn: str, n: int) -> tuple[float, float]:
    from rotation_operator.library import Encryptor

    with Encryptor(dsn, KEK, max_age=3600) as enc:
        enc.refresh()
        payload = os.urandom(64)
        t = time.perf_counter()
        values = [enc.encrypt(payload) for _ in range(n)]
        enc_rate = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for value, key_id in values:
            enc.decrypt(value, key_id)
        dec_rate = n / (time.perf_counter() - t)
    return enc_rate, dec_rate


# -- operator latency -------------------------------------------------------------------
def operator_latency(pg_dsn: str, repeat: int) -> dict[str, list[float]]:
    import testenv  # type: ignore[import-not-found]
    from kubernetes import client, config, watch

    state = Path(tempfile.mkdtemp(prefix="bench-cp-"))
    cp = testenv.ControlPlane(state)
    cp.start()
    op = None
    try:
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig), "KUBECACHEDIR": str(state / "kc")}
        kubectl = [str(cp.kubectl)]

        def k(*args: str, input: str | None = None) -> None:
            subprocess.run([*kubectl, *args], env=env, check=True, capture_output=True,
                           text=True, input=input)

        k("apply", "-k", str(ROOT / "manifests"))
        k("wait", "--for=condition=Established", "--timeout=60s",
          "crd/encryptionpolicies.rotation-operator.io")
        k("create", "namespace", "bench")
        k("-n", "bench", "create", "secret", "generic", "app-kek",
          f"--from-literal=kek={KEK.hex()}")
        k("-n", "bench", "create", "secret", "generic", "app-db", f"--from-literal=dsn={pg_dsn}")
        op_env = {**os.environ, "KUBECONFIG": str(cp.operator_kubeconfig)}
        op = subprocess.Popen([str(ROOT / ".venv" / "bin" / "rotation-operator"), "run",
                               "--liveness", "", "--metrics-port", "0"],
                              env=op_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sample = (ROOT / "manifests" / "samples" / "encryptionpolicy.yaml").read_text()
        for _ in range(20):
            try:
                k("-n", "bench", "apply", "-f", "-", input=sample)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.5)
        k("-n", "bench", "wait", "encpol/app", "--for=condition=Ready", "--timeout=60s")
        config.load_kube_config(str(cp.kubeconfig))
        api = client.CustomObjectsApi()
        seen: list[tuple[float, dict[str, Any]]] = []
        stop = threading.Event()

        def watcher() -> None:
            w = watch.Watch()
            for ev in w.stream(api.list_namespaced_custom_object, "rotation-operator.io",
                               "v1alpha1", "bench", "encryptionpolicies",
                               field_selector="metadata.name=app", timeout_seconds=600):
                seen.append((time.perf_counter(), ev["object"]))
                if stop.is_set():
                    w.stop()

        th = threading.Thread(target=watcher, daemon=True)
        th.start()
        time.sleep(1)
        to_rot, to_ready = [], []
        for version in range(2, 2 + repeat):
            seen.clear()
            t0 = time.perf_counter()
            k("-n", "bench", "patch", "encpol", "app", "--type=merge",
              "-p", json.dumps({"spec": {"version": version}}))
            rot = ready = None
            deadline = time.time() + 60
            while (rot is None or ready is None) and time.time() < deadline:
                for ts, obj in list(seen):
                    gen = obj["metadata"]["generation"]
                    conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
                    c = conds.get("Rotating")
                    if rot is None and c and c["status"] == "True" and \
                            c.get("observedGeneration") == gen and \
                            obj["spec"]["version"] == version:
                        rot = ts - t0
                    c = conds.get("Ready")
                    if ready is None and c and c["status"] == "True" and \
                            c.get("observedGeneration") == gen and \
                            obj.get("status", {}).get("observedVersion") == version:
                        ready = ts - t0
                time.sleep(0.01)
            to_rot.append(rot if rot is not None else float("nan"))
            to_ready.append(ready if ready is not None else float("nan"))
        stop.set()
        return {"rotating": to_rot, "ready": to_ready}
    finally:
        if op is not None:
            op.terminate()
            op.wait(10)
        cp.stop()


# -- orchestration ----------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_rotate":
        _rotate_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append",
                   help="row counts (repeatable; default 100000 and 1000000; add 10000000)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 512], help="plaintext bytes")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="engine worker processes (online)")
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--grace", type=float, default=0.0,
                   help="online grace wait (default 0 here: it is idle time for application "
                        "key rings, a fixed latency of up to 2 s by default, not throughput)")
    p.add_argument("--naive-rows", type=int, default=100_000)
    p.add_argument("--no-operator", action="store_true", help="skip the control-plane latency")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args()
    rows_list = args.rows or ([20_000] if args.quick else [100_000, 1_000_000])
    if args.quick:
        args.sizes, args.repeat, args.naive_rows = [64], 1, 5_000
    import testenv  # type: ignore[import-not-found]

    pg_dir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    pg_dir.chmod(0o755)  # the postgres OS user must traverse it
    pg = testenv.Postgres(pg_dir, fast=False)
    pg.start()
    results: dict[str, Any] = {"cases": []}
    try:
        dsn = pg.create_database("bench")
        for size in args.sizes:
            for rows in rows_list:
                log(f"loading {rows} rows x {size} B")
                load(dsn, rows, size)
                case: dict[str, Any] = {"rows": rows, "size": size}
                # The first rotation of a freshly loaded (compact) table shows the heap
                # growth that VACUUM then makes reusable.
                fresh = table_mb(dsn)
                first = rotate_child(dsn, "Online", args.workers, args.batch_size, args.grace)
                rotated = table_mb(dsn)
                vacuum(dsn)
                case["table_mb"] = {"before": fresh, "after_rotation": rotated,
                                    "after_vacuum": table_mb(dsn)}
                case["first_rotation_s"] = first["seconds"]
                fl, runs = [], {"Online": [], "Atomic": []}
                for rep in range(args.repeat):
                    for mode in ("Online", "Atomic"):
                        vacuum(dsn)
                        fl.append(floor(dsn))
                        vacuum(dsn)
                        r = rotate_child(dsn, mode, args.workers if mode == "Online" else 1,
                                         args.batch_size, args.grace)
                        runs[mode].append(r)
                        log(f"{rows}x{size} rep {rep + 1} {mode}: {r['seconds']:.2f}s "
                            f"({r['rows'] / r['seconds']:,.0f} rows/s), floor {fl[-1]:.2f}s, "
                            f"rss {r['rss_mb']:.0f} MB")
                case["floor_s"] = stats(fl)
                for mode, rs in runs.items():
                    secs = [r["seconds"] for r in rs]
                    case[mode] = {"seconds": stats(secs),
                                  "rows_per_s": stats([r["rows"] / r["seconds"] for r in rs]),
                                  "peak_rss_mb": max(r["rss_mb"] for r in rs)}
                if rows == max(rows_list):
                    case["ceiling_rows_per_s"] = stats([ceiling(dsn) for _ in range(args.repeat)])
                results["cases"].append(case)
        log(f"naive loop on {args.naive_rows} rows")
        load(dsn, args.naive_rows, 64)
        results["naive_rows_per_s"] = stats([naive(dsn, args.naive_rows)
                                             for _ in range(args.repeat)])
        enc, dec = zip(*[library(dsn, 100_000 if not args.quick else 10_000)
                         for _ in range(args.repeat)], strict=True)
        results["app_encrypt_ops_per_s"] = stats(list(enc))
        results["app_decrypt_ops_per_s"] = stats(list(dec))
        if not args.no_operator:
            log("operator latency on the real control plane")
            load(dsn, 1000, 64)
            lat = operator_latency(dsn, args.repeat)
            results["patch_to_rotating_s"] = stats(lat["rotating"])
            results["patch_to_ready_s"] = stats(lat["ready"])
    finally:
        pg.stop()
    report(results, args)
    return 0


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nrotation benchmark ({os.cpu_count()} cores, PostgreSQL defaults, "
          f"{args.repeat} repetitions: min / median; online uses {args.workers} workers, "
          f"grace {args.grace:g} s)\n")
    hdr = (f"{'rows':>9} {'bytes':>5} {'mode':<7} {'s min/median':>15} "
           f"{'rows/s best/median':>19} {'floor min/med':>13} {'x floor':>7} {'rss MB':>6}")
    print(hdr)
    print("-" * len(hdr))
    for c in res["cases"]:
        for mode in ("Online", "Atomic"):
            m = c[mode]
            print(f"{c['rows']:>9} {c['size']:>5} {mode:<7} "
                  f"{m['seconds']['min']:>7.2f}/{m['seconds']['median']:<7.2f} "
                  f"{m['rows_per_s']['max']:>9,.0f}/{m['rows_per_s']['median']:<9,.0f} "
                  f"{c['floor_s']['min']:>6.2f}/{c['floor_s']['median']:<6.2f} "
                  f"{m['seconds']['median'] / c['floor_s']['median']:>7.2f} "
                  f"{m['peak_rss_mb']:>6.0f}")
        t = c["table_mb"]
        print(f"{'':>9} {'':>5} first rotation of the compact table {c['first_rotation_s']:.2f}s;"
              f" table MB: {t['before']:.0f} before, {t['after_rotation']:.0f} after it, "
              f"{t['after_vacuum']:.0f} after VACUUM (reusable space)")
    big = max(res["cases"], key=lambda c: (c["size"] == 64, c["rows"]))
    naive_rps = res["naive_rows_per_s"]["median"]
    print(f"\nceiling (AES-GCM decrypt+encrypt, 1 process, no DB): "
          f"{big['ceiling_rows_per_s']['median']:,.0f} rows/s")
    print(f"naive loop (SELECT all + one UPDATE per row; {args.naive_rows} rows, extrapolated "
          f"to {big['rows']:,}): {naive_rps:,.0f} rows/s = {big['rows'] / naive_rps:.1f}s "
          f"(extrapolated)")
    online = big["Online"]["rows_per_s"]["median"]
    print(f"engine online / naive: {online / naive_rps:.1f}x faster; engine online time / "
          f"floor: {big['Online']['seconds']['median'] / big['floor_s']['median']:.2f}x "
          "(median/median)")
    print(f"app library warm: encrypt {res['app_encrypt_ops_per_s']['median']:,.0f} ops/s, "
          f"decrypt {res['app_decrypt_ops_per_s']['median']:,.0f} ops/s")
    if "patch_to_rotating_s" in res:
        print("operator: kubectl patch -> Rotating=True "
              f"{res['patch_to_rotating_s']['median']:.2f}s, -> Ready=True+observedVersion "
              f"{res['patch_to_ready_s']['median']:.2f}s (median)")
    summary = {
        "online_1m_64b_rows_per_s": online,
        "online_1m_64b_seconds": big["Online"]["seconds"]["median"],
        "atomic_1m_64b_seconds": big["Atomic"]["seconds"]["median"],
        "floor_1m_64b_seconds": big["floor_s"]["median"],
        "online_to_floor_ratio": big["Online"]["seconds"]["median"] / big["floor_s"]["median"],
        "naive_rows_per_s": naive_rps,
        "naive_extrapolated": True,
        "engine_to_naive_speedup": online / naive_rps,
        "aes_ceiling_rows_per_s": big["ceiling_rows_per_s"]["median"],
        "peak_rss_mb_max": max(c[m]["peak_rss_mb"] for c in res["cases"]
                               for m in ("Online", "Atomic")),
        "app_encrypt_ops_per_s": res["app_encrypt_ops_per_s"]["median"],
        "app_decrypt_ops_per_s": res["app_decrypt_ops_per_s"]["median"],
        "patch_to_rotating_s": res.get("patch_to_rotating_s", {}).get("median"),
        "patch_to_ready_s": res.get("patch_to_ready_s", {}).get("median"),
        "rows_measured": big["rows"],
        "cases": res["cases"],
    }
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    sys.exit(main())
