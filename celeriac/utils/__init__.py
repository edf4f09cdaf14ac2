"""Small helpers with Celery's public import paths (``celery.utils.log``)."""
