"""A package laid out like a Celery project: the app lives in ``proj/celery.py``.

``celeriac -A tests.apps.proj`` finds it there, and the app autodiscovers
``proj/tasks.py``.
"""
