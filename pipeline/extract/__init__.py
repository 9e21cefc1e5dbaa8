"""Extraction: schema-valid JSON from a document's pages (schema, grammar, the stage, chunk merging)."""
