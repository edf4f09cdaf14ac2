"""A package with no tasks module: autodiscover_tasks skips it quietly."""
