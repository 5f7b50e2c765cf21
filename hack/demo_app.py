"""The demo's stand-in application: seeds legacy rows, writes through the library,
and checks that every secret still decrypts to what was written.

Plaintexts are derived from the row id (``demo-secret-<id>``) so ``check`` knows the
expected value of every row without keeping a copy; it never prints a plaintext.
"""

from __future__ import annotations

import argparse
import os
import sys

import psycopg

from rotation_operator.crypto import codec as crypto
from rotation_operator.library import Encryptor


def plaintext(row_id: int) -> bytes:
    return b"demo-secret-%d" % row_id


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("command", choices=("seed", "write", "check"))
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--kek-file", required=True)
    args = p.parse_args()
    dsn = os.environ["DATABASE_URL"]
    with open(args.kek_file, "rb") as f:
        kek = crypto.parse_kek(f.read(), args.kek_file)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if args.command == "seed":
            conn.execute("CREATE TABLE IF NOT EXISTS secrets (id bigint PRIMARY KEY, "
                         "value bytea NOT NULL, key_id integer)")
            # The operator's role reads and rewrites these columns only (docs/database-roles.md).
            conn.execute("GRANT SELECT (id, value, key_id, ctid, xmin), UPDATE (value, key_id) "
                         "ON secrets TO rotation_operator")
            with conn.cursor() as cur:  # pre-envelope rows: under the KEK, key_id NULL
                cur.executemany("INSERT INTO secrets VALUES (%s, %s, NULL)",
                                [(i, crypto.encrypt(kek, plaintext(i)))
                                 for i in range(1, args.rows + 1)])
            print(f"seeded {args.rows} legacy rows (encrypted directly with the KEK)")
        elif args.command == "write":
            row = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM secrets").fetchone()
            assert row is not None  # an aggregate without GROUP BY: always one row
            start = row[0]
            with Encryptor(dsn, kek) as enc, conn.cursor() as cur:
                rows = [(i, *enc.encrypt(plaintext(i))) for i in range(start, start + args.rows)]
                cur.executemany("INSERT INTO secrets VALUES (%s, %s, %s)", rows)
            print(f"application wrote {args.rows} rows through the library "
                  f"(key v{rows[0][2]})")
        else:
            bad = total = 0
            with Encryptor(dsn, kek) as enc:
                for row_id, value, key_id in conn.execute(
                        "SELECT id, value, key_id FROM secrets ORDER BY id"):
                    total += 1
                    bad += enc.decrypt(value, key_id) != plaintext(row_id)
            print(f"checked {total} secrets: {total - bad} decrypt to exactly what was "
                  f"written, {bad} differ")
            return 1 if bad or not total else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
