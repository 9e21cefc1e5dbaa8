"""Job entry points and job configurations for docpipe."""
