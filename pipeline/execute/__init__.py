"""Where a run executes: the only package that knows Ray (the run, the local loop, the Ray Data plan, clusters)."""
