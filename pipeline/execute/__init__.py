"""Where a run executes: the only package that imports Ray.

run.py the run as a flow; local.py the in-process loop; plan.py the Ray Data plan; stages.py what both run;
resources.py the resource policy (pure); cluster.py starting or joining Ray; train.py fine-tuning under Ray Train;
submit.py sending a run as a Ray job; progress.py progress lines.
"""
