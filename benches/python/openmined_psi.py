"""Times OpenMined PSI (cardinality mode) on the same shape as the ECDH bench.

Prints one JSON line: the item count, the overlap it found, and the seconds
each phase took. Run by `cargo bench --bench ecdh` in the bench's virtual
environment; usable alone: `python openmined_psi.py N OVERLAP`.
"""

import json
import os
import sys
import time

import private_set_intersection.python as psi


def items(prefix, start, count):
    return [f"{prefix}{i}@example.com" for i in range(start, start + count)]


def main():
    n = int(sys.argv[1])
    overlap = int(sys.argv[2])
    structure = sys.argv[3] if len(sys.argv) > 3 else "raw"
    # Server and client share `overlap` items and hold n each.
    server_items = items("u", 0, n)
    client_items = items("u", 0, overlap) + items("c", 0, n - overlap)
    ds = {"raw": psi.DataStructure.RAW, "gcs": psi.DataStructure.GCS}[structure]

    t0 = time.perf_counter()
    server = psi.server.CreateWithNewKey(False)
    client = psi.client.CreateWithNewKey(False)
    setup = server.CreateSetupMessage(1e-9, n, server_items, ds)
    t1 = time.perf_counter()
    request = client.CreateRequest(client_items)
    t2 = time.perf_counter()
    response = server.ProcessRequest(request)
    t3 = time.perf_counter()
    size = client.GetIntersectionSize(setup, response)
    t4 = time.perf_counter()
    print(
        json.dumps(
            {
                "n": n,
                "structure": structure,
                "overlap": size,
                "threads": os.cpu_count(),
                "setup_s": t1 - t0,
                "request_s": t2 - t1,
                "process_s": t3 - t2,
                "intersect_s": t4 - t3,
                "total_s": t4 - t0,
            }
        )
    )


if __name__ == "__main__":
    main()
