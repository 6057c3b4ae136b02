# syntax=docker/dockerfile:1
# The one CityPlane image: `cityplane gateway|registry|identity|operator|…` all run from it.
#   docker build -t cityplane:dev .
#   docker run --rm cityplane:dev version

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: wheels for CityPlane and every dependency, pinned by constraints.txt -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when the pins change.
COPY pyproject.toml constraints.txt README.md ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
RUN pip wheel --wheel-dir /wheels -c constraints.txt -r /tmp/requirements.txt
COPY cityplane/ cityplane/
COPY gateway/ gateway/
COPY identity/ identity/
COPY registry/ registry/
COPY operators/ operators/
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/cityplane \
 && /opt/cityplane/bin/pip install --no-index --find-links /wheels cityplane \
 && /opt/cityplane/bin/pip uninstall -y pip

# --- runtime: the interpreter, the virtualenv, a non-root user; no compilers, no pip --------
FROM ${PYTHON_IMAGE}
# 10001: a numeric user outside the host's range, the chart's podSecurityContext.runAsUser.
RUN groupadd --system --gid 10001 cityplane \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/cityplane --create-home \
      --shell /usr/sbin/nologin cityplane
COPY --from=build /opt/cityplane /opt/cityplane
# The root filesystem is read-only in the chart: bytecode was compiled at install time.
ENV PATH=/opt/cityplane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/cityplane
# gateway proxy, gateway status, registry, identity hub, operator health
EXPOSE 8080 8081 8090 8070 8082
USER 10001:10001
ENTRYPOINT ["cityplane"]
CMD ["--help"]
