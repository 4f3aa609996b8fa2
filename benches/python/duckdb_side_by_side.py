"""The same work as Cleanroom's governed overlap and query, in DuckDB.

Run by `cargo bench --bench side_by_side` in the bench's virtual
environment: `python duckdb_side_by_side.py CUSTOMERS.parquet
AUDIENCE.parquet THREADS`. The Parquet files hold exactly what Cleanroom
stores (32-byte fingerprints and the allowed columns). Tables are loaded
into memory first (not timed); each statement's best of three runs is
printed as one JSON line.
"""

import json
import sys
import time

import duckdb

import duckdb_shapes

SQL = {
    "overlap": duckdb_shapes.OVERLAP,
    "governed": duckdb_shapes.GOVERNED,
    "plain": duckdb_shapes.PLAIN,
}


def main():
    customers, audience, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute(f"CREATE TABLE customers AS SELECT * FROM read_parquet('{customers}')")
    con.execute(f"CREATE TABLE audience AS SELECT * FROM read_parquet('{audience}')")
    out = {"version": duckdb.__version__, "threads": threads}
    for name, sql in SQL.items():
        best = None
        for _ in range(3):
            t = time.perf_counter()
            rows = con.execute(sql).fetchall()
            took = time.perf_counter() - t
            best = took if best is None else min(best, took)
        out[name + "_s"] = best
        if name == "overlap":
            out["overlap"] = rows[0][0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
