"""The application: ``celery -A config worker`` finds ``config.app``."""

from config.celery_app import app

__all__ = ["app"]
