# One image for both programs: `meshward-operator` (the Kopf operator) and
# `meshward-sidecar` (the per-pod agent). The chart and the injector pick the command.
# Not built in CI here (no Docker engine on our build machines); tests/unit/test_packaging.py
# builds the same wheel this image installs.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY operator ./operator
COPY sidecar ./sidecar
# src/meshward/{operator,sidecar} are symlinks into the folders above; the wheel resolves them.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels meshward && rm -rf /wheels
USER 65532:65532
CMD ["meshward-operator"]
