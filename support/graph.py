"""The test graph wiped: what every test and benchmark starts from."""
from __future__ import annotations

from app.serving import churntop

# Bounded transactions, edges first: one statement deleting everything outlives the server's
# transaction timeout on the graph the soak leaves, and a thousand heavy nodes with their edges its
# transaction memory.
WIPE = ("MATCH ()-[r]->() WITH r LIMIT 20000 DELETE r RETURN count(*) AS n",
        "MATCH (n) WHERE NOT n:_Migration WITH n LIMIT 20000 DELETE n RETURN count(*) AS n")


def wipe(driver, database: str) -> None:
    """Delete every edge, then every node but the migration records, in bounded transactions (one
    statement for all outlives the transaction timeout on the graph `make bench` leaves)."""
    with driver.session(database=database) as s:
        for statement in WIPE:
            while s.execute_write(lambda tx: tx.run(statement).single()["n"]):
                pass
    churntop.forget()  # this process's kept churn list was the wiped graph's
