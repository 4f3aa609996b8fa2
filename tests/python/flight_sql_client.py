"""A Flight SQL client no one here wrote: the Python ADBC driver, with
mutual TLS, against a Cleanroom server. Prints one JSON object with what it
saw; tests/flight_sql.rs starts the server and checks the output.

Environment: CLEANROOM_URI (grpc+tls://host:port), CLEANROOM_CA,
CLEANROOM_CERT, CLEANROOM_KEY (PEM files), CLEANROOM_SQL (a governed
query), CLEANROOM_REFUSED_SQL (a query the agreement refuses).
"""

import json
import os

import adbc_driver_flightsql.dbapi as flight_sql
from adbc_driver_flightsql import DatabaseOptions

AGREEMENT = "retail-media-demo"


def read(name):
    with open(os.environ[name]) as f:
        return f.read()


def connect(client_certificate=True):
    options = {
        DatabaseOptions.TLS_ROOT_CERTS.value: read("CLEANROOM_CA"),
        "adbc.flight.sql.rpc.call_header.x-cleanroom-agreement": AGREEMENT,
    }
    if client_certificate:
        options[DatabaseOptions.MTLS_CERT_CHAIN.value] = read("CLEANROOM_CERT")
        options[DatabaseOptions.MTLS_PRIVATE_KEY.value] = read("CLEANROOM_KEY")
    return flight_sql.connect(os.environ["CLEANROOM_URI"], db_kwargs=options)


out = {}
with connect() as conn:
    objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
    out["catalogs"] = sorted(c["catalog_name"] for c in objects)
    out["tables"] = {
        c["catalog_name"]: {
            t["table_name"]: [col["column_name"] for col in t["table_columns"]]
            for s in c["catalog_db_schemas"]
            for t in s["db_schema_tables"]
        }
        for c in objects
    }
    out["table_types"] = conn.adbc_get_table_types()
    with conn.cursor() as cur:
        cur.execute(os.environ["CLEANROOM_SQL"])
        table = cur.fetch_arrow_table()
        frame = table.to_pandas()
        out["columns"] = list(frame.columns)
        out["rows"] = frame.to_dict(orient="records")
        metadata = table.schema.metadata or {}
        out["metadata"] = {k.decode(): v.decode() for k, v in metadata.items()}
    with conn.cursor() as cur:
        try:
            cur.execute(os.environ["CLEANROOM_REFUSED_SQL"])
            cur.fetch_arrow_table()
            out["refused"] = None
        except Exception as e:  # the driver's error carries the server's text
            out["refused"] = str(e)

try:
    with connect(client_certificate=False) as conn:
        with conn.cursor() as cur:
            cur.execute(os.environ["CLEANROOM_SQL"])
            cur.fetch_arrow_table()
    out["without_certificate"] = None
except Exception as e:
    out["without_certificate"] = str(e)

print(json.dumps(out, default=str))
