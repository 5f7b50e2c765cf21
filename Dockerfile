# syntax=docker/dockerfile:1
# Multi-stage: build a wheel, install it into a venv, copy the venv into a slim runtime.
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /venv
COPY pyproject.toml README.md ./
COPY src ./src
RUN /venv/bin/pip install --no-compile .

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="rotation-operator" \
      org.opencontainers.image.description="Envelope-encryption key rotation for PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=build /venv /venv
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["rotation-operator"]
CMD ["run", "--log-format=json"]
