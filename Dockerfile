# syntax=docker/dockerfile:1
# The one CityPlane image: `cityplane gateway|registry|identity|operator|…` all run from it.
#   docker build -t cityplane:dev .
#   docker run --rm cityplane:dev version

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: wheels for CityPlane and every dependency, pinned by constraints.txt -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A C compiler for the compiled gateway modules (ADR 15); the image's Python has its headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && test -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when the pins change.
COPY pyproject.toml constraints.txt README.md ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
RUN pip wheel --wheel-dir /wheels -c constraints.txt -r /tmp/requirements.txt
# Cython and setuptools for the build only: in a directory of their own, not in the virtualenv
# that ships.
RUN python - <<'PY' > /tmp/speedups.txt
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["speedups"]))
PY
RUN pip install --target /opt/speedups-build -c constraints.txt -r /tmp/speedups.txt
COPY cityplane/ cityplane/
COPY gateway/ gateway/
COPY identity/ identity/
COPY registry/ registry/
COPY operators/ operators/
# The compiled gateway modules are built into the installed package (site-packages/gateway/
# _compiled/<ABI tag>/), by the runtime stage's interpreter (same image, same ABI). From /, so
# that Python imports the installed gateway package, not /src's; a build copied in with the
# sources (a developer's gateway/_compiled) is never used.
RUN rm -rf gateway/_compiled \
 && pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/cityplane \
 && /opt/cityplane/bin/pip install --no-index --find-links /wheels cityplane \
 && cd / \
 && PYTHONPATH=/opt/speedups-build /opt/cityplane/bin/python -m gateway.speedups build \
 && /opt/cityplane/bin/python -c "import gateway.speedups as s; assert s.compiled(), s.status()" \
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
