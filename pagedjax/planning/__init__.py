"""Capacity planning: the planner, the memory report, request logs."""
