// The churn scores' stamp (app/churn.py writes it at the end of each scoring run): one node, found by its key.
CREATE CONSTRAINT churn_run_id IF NOT EXISTS FOR (r:ChurnRun) REQUIRE r.id IS UNIQUE;
