"""The tools around a run: demo, benchmarks, evaluation, the report and fine-tuning."""
