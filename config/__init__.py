"""The sample application: ``celery -A config worker`` finds ``config.app``; ``config.engine``."""

from config.celery_app import app, engine

__all__ = ["app", "engine"]
