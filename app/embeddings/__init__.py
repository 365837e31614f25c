"""From graph to vectors: export, train, full and incremental embedding, write-back."""
