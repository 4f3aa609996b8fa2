"""The scale bench's DuckDB side: the same overlap and query shapes as
Cleanroom's, on the same stored data, in a database file that may spill.

Run by `cargo bench --bench scale` in the bench's virtual environment:
`python duckdb_scale.py CUSTOMERS.parquet AUDIENCE.parquet DB_FILE THREADS
MEMORY_LIMIT`. The Parquet files hold exactly what Cleanroom stores
(32-byte fingerprints and the allowed columns). The tables are loaded into
the database file first (timed apart); each statement is run three times
and its first and best times are printed, with the most temporary (spilled)
bytes DuckDB held while it ran and the process's peak resident memory, as
one JSON line.
"""

import json
import resource
import sys
import threading
import time

import duckdb

import duckdb_shapes

SQL = {
    "overlap": duckdb_shapes.OVERLAP,
    "governed": duckdb_shapes.GOVERNED,
}


class Spill:
    """The most bytes of temporary files DuckDB held, sampled every 50 ms
    from its temporary directory while a statement ran."""

    def __init__(self, directory):
        self.directory = directory
        self.most = 0
        self.running = True
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        import os

        while self.running:
            total = 0
            for root, _, files in os.walk(self.directory):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(root, f))
                    except OSError:
                        pass
            self.most = max(self.most, total)
            time.sleep(0.05)

    def stop(self):
        self.running = False
        self.thread.join()
        return self.most


def main():
    customers, audience, db, threads, memory = sys.argv[1:6]
    temp = db + ".tmp"
    con = duckdb.connect(db)
    con.execute(f"SET threads = {int(threads)}")
    con.execute(f"SET memory_limit = '{memory}'")
    con.execute(f"SET temp_directory = '{temp}'")
    out = {"version": duckdb.__version__, "threads": int(threads), "memory_limit": memory}
    spill = Spill(temp)
    t = time.perf_counter()
    con.execute(f"CREATE TABLE customers AS SELECT * FROM read_parquet('{customers}')")
    con.execute(f"CREATE TABLE audience AS SELECT * FROM read_parquet('{audience}')")
    con.execute("CHECKPOINT")
    out["load_s"] = time.perf_counter() - t
    out["load_spilled_bytes"] = spill.stop()
    for name, sql in SQL.items():
        times = []
        spill = Spill(temp)
        for _ in range(3):
            t = time.perf_counter()
            rows = con.execute(sql).fetchall()
            times.append(time.perf_counter() - t)
        out[name + "_first_s"] = times[0]
        out[name + "_s"] = min(times)
        out[name + "_spilled_bytes"] = spill.stop()
        if name == "overlap":
            out["overlap"] = rows[0][0]
    con.close()
    # Peak resident memory of this process (kilobytes on Linux).
    out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
