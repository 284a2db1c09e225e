# syntax=docker/dockerfile:1
# Build: a wheel of cxpulse and its runtime dependencies (no dev tools, no embedded broker).
FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip build
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Run: slim base, non-root user, only what the worker needs.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CX_DATA_DIR=/var/lib/cxpulse \
    CX_HTTP_PORT=6066
RUN useradd --system --uid 10001 --home-dir /var/lib/cxpulse --create-home cxpulse
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER cxpulse
WORKDIR /var/lib/cxpulse
EXPOSE 6066
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('CX_HTTP_PORT', '6066')}/healthz\", timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["cxpulse"]
CMD ["worker"]
