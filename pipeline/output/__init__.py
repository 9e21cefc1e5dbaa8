"""Output: where results land (the store, the Parquet writer, the ledger, the sink, resume, the lease, the lake)."""
