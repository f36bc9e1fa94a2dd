# syntax=docker/dockerfile:1
# The ambient-grpc-auth image: the package, its runtime dependencies and the
# `ambient-grpc-auth` command, run as an unprivileged user. No tests, no
# harnesses, no development tools.
#
#   docker build -t ambient-grpc-auth:0.1.0 .
#   docker run --rm ambient-grpc-auth:0.1.0 --help
#
# See docs/deploy.md.

# --- build: the wheels of the package and of everything it needs -------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# What the wheel is built from, and nothing else (see also .dockerignore).
COPY pyproject.toml README.md LICENSE ./
COPY ambient_grpc_auth ./ambient_grpc_auth
RUN pip wheel --wheel-dir /wheels .

# --- runtime -----------------------------------------------------------------
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Installed offline from the build stage's wheels, which are mounted for this
# step only, so that they add nothing to the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/ambient_grpc_auth-*.whl \
    && groupadd --system --gid 10001 ambient \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin ambient
# Numeric, so that runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# token-server /token, /metrics; session-server gRPC; session-server metrics.
EXPOSE 8080 9000 9090
ENTRYPOINT ["ambient-grpc-auth"]
CMD ["--help"]
