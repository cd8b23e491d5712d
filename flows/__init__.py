"""Prefect flows: they only sequence the tasks in tasks/ (DESIGN.md, STYLE.md rule 4)."""
