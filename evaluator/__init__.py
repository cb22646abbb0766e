"""The evaluator the coordinator's operator runs: loads base + candidate, measures held-out loss, reports it."""
