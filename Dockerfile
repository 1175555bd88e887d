# gatebill worker image: build with the Rust toolchain, run on slim Debian.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang libclang-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gatebill

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libstdc++6 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/gatebill /usr/local/bin/gatebill
COPY gatebill.example.toml /etc/gatebill/gatebill.toml
VOLUME /var/lib/gatebill
ENV GATEBILL_CONFIG=/etc/gatebill/gatebill.toml GATEBILL_STATE_DIR=/var/lib/gatebill GATEBILL_METRICS_ADDRESS=0.0.0.0:9898
EXPOSE 9898
ENTRYPOINT ["gatebill"]
CMD ["run"]
