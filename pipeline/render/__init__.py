"""Render: a document's bytes in, page records out (open, draw, route to the text layer or the model)."""
