# One image for every role (web, workers, beat, flower); docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sagas ./sagas
COPY tasks ./tasks
COPY config ./config
# tasks/ and config/ (the sample) run from /app; the installed wheel holds only the engine.
RUN pip install '.[web,postgres,otel]' \
    && useradd --create-home --uid 10001 sagas \
    && mkdir -p /app/var \
    && chown sagas /app/var

USER sagas
EXPOSE 8000 5555
CMD ["uvicorn", "config.web:app", "--host", "0.0.0.0", "--port", "8000"]
