// InterestSAGE ranks by inner product, stored through the reduction to cosine (app/embeddings/state.py):
// embeddings are now both spectral blocks plus one coordinate ($embed_dim = IG_EMBED_DIM + IG_SHARP_DIM + 1).
// The old 64-d vectors are dropped with the indexes; the next training re-embeds every node.
DROP INDEX user_embedding IF EXISTS;
DROP INDEX item_embedding IF EXISTS;
MATCH (n:User|Item) WHERE n.embedding IS NOT NULL
CALL { WITH n REMOVE n.embedding, n.embedding_version } IN TRANSACTIONS OF 10000 ROWS;
CREATE VECTOR INDEX user_embedding IF NOT EXISTS FOR (u:User) ON (u.embedding)
OPTIONS {indexConfig: {`vector.dimensions`: $embed_dim, `vector.similarity_function`: 'cosine',
                       `vector.hnsw.m`: 16, `vector.hnsw.ef_construction`: 32}};
CREATE VECTOR INDEX item_embedding IF NOT EXISTS FOR (i:Item) ON (i.embedding)
OPTIONS {indexConfig: {`vector.dimensions`: $embed_dim, `vector.similarity_function`: 'cosine',
                       `vector.hnsw.m`: 16, `vector.hnsw.ef_construction`: 32}};
