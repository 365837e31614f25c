// Identity: MERGE on these keys is the basis of idempotent ingest.
CREATE CONSTRAINT user_id IF NOT EXISTS FOR (u:User) REQUIRE u.id IS UNIQUE;
CREATE CONSTRAINT item_id IF NOT EXISTS FOR (i:Item) REQUIRE i.id IS UNIQUE;
CREATE CONSTRAINT event_id IF NOT EXISTS FOR (e:Event) REQUIRE e.id IS UNIQUE;
CREATE CONSTRAINT migration_version IF NOT EXISTS FOR (m:_Migration) REQUIRE m.version IS UNIQUE;

// Change tracking: the refresh job finds what changed since its watermark without a scan.
CREATE INDEX user_changed_at IF NOT EXISTS FOR (u:User) ON (u.changed_at);
CREATE INDEX item_changed_at IF NOT EXISTS FOR (i:Item) ON (i.changed_at);
CREATE INDEX interacted_changed_at IF NOT EXISTS FOR ()-[r:INTERACTED]-() ON (r.changed_at);

// Serving: cosine k-NN over the GraphSAGE embeddings ($embed_dim comes from config).
CREATE VECTOR INDEX user_embedding IF NOT EXISTS FOR (u:User) ON (u.embedding)
OPTIONS {indexConfig: {`vector.dimensions`: $embed_dim, `vector.similarity_function`: 'cosine'}};
CREATE VECTOR INDEX item_embedding IF NOT EXISTS FOR (i:Item) ON (i.embedding)
OPTIONS {indexConfig: {`vector.dimensions`: $embed_dim, `vector.similarity_function`: 'cosine'}};
