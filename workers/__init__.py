"""GPU-pinned workers: thin Celery tasks, a Celery-free runner and engines."""
