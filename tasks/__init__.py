"""Prefect tasks around sao_core: read by URI, call the library, write, return a small manifest.

Retries, timeouts, cache policies, task-run names and Prefect artifacts live here and nowhere else.
"""
