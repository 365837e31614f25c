// The serving log (cypher.APPLIED_LOG): API processes read the entries after the run they applied.
CREATE INDEX applied_seq IF NOT EXISTS FOR (a:_Applied) ON (a.seq);
// API processes look up recent erasures by time.
CREATE INDEX erased_at IF NOT EXISTS FOR (x:_Erased) ON (x.at);
