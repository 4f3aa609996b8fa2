"""The overlap and query shapes Cleanroom's benches time, as DuckDB runs
them on the same stored data (imported by the DuckDB bench scripts)."""

# People in both, matched on email or phone (semi-joins; rows of one
# person counted once per row, which the demo shape barely has).
OVERLAP = """
    SELECT COUNT(*) FROM customers c
    WHERE c.email IN (SELECT email FROM audience)
       OR c.phone IN (SELECT phone FROM audience WHERE phone IS NOT NULL)
"""

# The governed query's shape under thresholds: groups of at least 50
# distinct people.
GOVERNED = """
    SELECT c.region, COUNT(*) AS n, AVG(c.lifetime_value) AS ltv
    FROM customers c JOIN audience a ON c.email = a.email
    GROUP BY c.region HAVING COUNT(DISTINCT c.email) >= 50
"""

# The same without the minimum.
PLAIN = """
    SELECT c.region, COUNT(*) AS n, AVG(c.lifetime_value) AS ltv
    FROM customers c JOIN audience a ON c.email = a.email
    GROUP BY c.region
"""
