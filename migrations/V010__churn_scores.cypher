// Stored churn scores (app/churn.py): the API reads the top k from this index instead of scanning edges.
CREATE INDEX user_churn_score IF NOT EXISTS FOR (u:User) ON (u.churn_score);
CREATE CONSTRAINT churn_model_version IF NOT EXISTS FOR (m:ChurnModel) REQUIRE m.version IS UNIQUE;
