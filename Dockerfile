# The backchannel server image: the kernel and every standard plugin, as wheels, in a slim
# Python, run as a non-root user with backchannel.production.toml (listens on 0.0.0.0:8765).
#
#   docker build -t backchannel .
#   docker run -p 8765:8765 -e CHAT_JWT_SECRET=... backchannel
#
# Several instances behind nginx, on one Redis: compose.yaml. tests/test_deploy.py runs
# this file's RUN, HEALTHCHECK and CMD steps in a fresh venv (no container engine there).

# ---- build: one wheel per distribution (kernel + standard plugins) into /wheels
FROM python:3.12-slim AS build
COPY --from=ghcr.io/astral-sh/uv:0.13 /uv /bin/uv
WORKDIR /src
COPY . .
RUN uv build --all-packages --wheel --out-dir /wheels

# ---- run: the wheels installed into a venv; nothing of the build stage but them
FROM python:3.12-slim
ENV PATH=/opt/backchannel/bin:$PATH PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/backchannel && /opt/backchannel/bin/pip install --no-cache-dir /wheels/*.whl 'backchannel[uvloop]' && rm -rf /wheels
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin backchannel
COPY backchannel.production.toml /etc/backchannel/backchannel.toml
USER backchannel
EXPOSE 8765
# /readyz: 200 once serving with its broker reachable, 503 while Redis is away or shutting down
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('BACKCHANNEL_SERVER__PORT', '8765'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["backchannel", "serve", "--config", "/etc/backchannel/backchannel.toml"]
