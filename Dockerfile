# One image for both processes of the product:
#   gateway (the default):  docker run -v "$PWD/deploy/gateway:/etc/gateway:ro" -p 8080:8080 IMAGE
#   inventory:              docker run --entrypoint python IMAGE -m inventory --db /data/inventory.db --listen 0.0.0.0:8001
# deploy/compose.yaml and deploy/kubernetes/ show both wired together.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and volumes can be
# chowned to it (fsGroup: 10001).
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin gateway

WORKDIR /app

# Dependencies first, in their own layer: rebuilt only when pyproject.toml or the pinned
# constraints change, not on every code edit.
COPY pyproject.toml constraints.txt README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The source tree keeps its layout, installed editable from /app (no dev extras): both
# programs then read the top-level schemas/, the one copy (a wheel carries its own, setup.py).
COPY setup.py ./
COPY schemas/ schemas/
COPY inventory/ inventory/
COPY sqlshelf/ sqlshelf/
COPY gateway/ gateway/
RUN pip install --no-deps -e . \
 && python -m compileall -q gateway inventory sqlshelf

# A default route table (the same one compose and Kubernetes mount over this directory),
# and /data for the inventory's store, owned by the runtime user.
COPY deploy/gateway/routes.yaml /etc/gateway/routes.yaml
RUN mkdir -p /data && chown gateway:gateway /data

USER 10001:10001

# 8080 public listener, 9080 admin listener (health, readiness, metrics: never publish it
# to the outside), 8001 the inventory when the container runs that instead.
EXPOSE 8080 9080 8001

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9080/healthz', timeout=2)"]

# SIGTERM (docker stop, Kubernetes) drains in-flight requests for up to
# limits.shutdown_grace (30 s by default); give the container more than that to stop.
ENTRYPOINT ["python", "-m", "gateway"]
# The admin listener is pinned to every interface here, whatever the file says, so that the
# HEALTHCHECK above and the Kubernetes probes always find it on port 9080.
CMD ["--config", "/etc/gateway/routes.yaml", "--admin", "0.0.0.0:9080"]
