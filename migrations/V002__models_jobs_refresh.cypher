// Model versions, admin jobs and the refresh worker's durable state.
CREATE CONSTRAINT model_version IF NOT EXISTS FOR (m:Model) REQUIRE m.version IS UNIQUE;
CREATE CONSTRAINT job_id IF NOT EXISTS FOR (j:Job) REQUIRE j.id IS UNIQUE;
CREATE CONSTRAINT refresh_key IF NOT EXISTS FOR (s:_Refresh) REQUIRE s.key IS UNIQUE;
CREATE INDEX job_state IF NOT EXISTS FOR (j:Job) ON (j.state);
