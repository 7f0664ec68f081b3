# scriptd with the production engine (V8). The V8 crate downloads its prebuilt static
# library during `cargo build`, so this build needs network access to its release files.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/scriptd /usr/local/bin/scriptd
USER nobody
ENTRYPOINT []
CMD ["scriptd", "run"]
