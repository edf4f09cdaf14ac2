"""Wire formats: the task message (Celery protocol v2, v1 read-only) and its serializers."""
