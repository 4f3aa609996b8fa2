# Cleanroom server image: built in one stage, run in a small one as a
# non-root user, with its data on a volume.
#
#   docker build --build-arg CLEANROOM_COMMIT="$(git rev-parse --short=12 HEAD)" -t cleanroom .
#   docker run --rm -v cleanroom-data:/var/lib/cleanroom cleanroom certs init --dir /var/lib/cleanroom/certs --san cleanroom.example.com
#   docker run -d --name cleanroom -p 50051:50051 \
#     -v cleanroom-data:/var/lib/cleanroom \
#     -v "$PWD/policies:/etc/cleanroom/policies:ro" cleanroom

FROM rust:1-bookworm AS build
WORKDIR /src
ARG CLEANROOM_COMMIT="unknown commit"
ENV CLEANROOM_COMMIT=${CLEANROOM_COMMIT}
COPY . .
RUN cargo build --release --locked --bin cleanroom \
 && install -m 0755 target/release/cleanroom /usr/local/bin/cleanroom

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/cleanroom --shell /usr/sbin/nologin cleanroom \
 && mkdir -p /var/lib/cleanroom /etc/cleanroom/policies \
 && chown cleanroom:cleanroom /var/lib/cleanroom
COPY --from=build /usr/local/bin/cleanroom /usr/local/bin/cleanroom
COPY deploy/config.toml /etc/cleanroom/config.toml
COPY policies/ /etc/cleanroom/policies/
USER cleanroom
VOLUME ["/var/lib/cleanroom"]
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/cleanroom"]
CMD ["serve", "--config", "/etc/cleanroom/config.toml", "--listen", "0.0.0.0:50051", "--log-format", "json"]
