"""A package whose ``tasks`` module holds shared tasks, found by autodiscover_tasks."""
