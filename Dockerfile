# Build and run fhirledger. Used by docker-compose.yml.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libpq-dev libsqlite3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY schema schema
COPY migrations migrations
COPY openapi openapi
RUN cargo build --release --locked --bin fhirledger

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpq5 libsqlite3-0 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/fhirledger --create-home fhirledger
COPY --from=build /src/target/release/fhirledger /usr/local/bin/fhirledger
USER fhirledger
WORKDIR /var/lib/fhirledger
ENV FHIRLEDGER_LISTEN=0.0.0.0:8080 FHIRLEDGER_DATA_DIR=/var/lib/fhirledger/data
EXPOSE 8080
ENTRYPOINT ["fhirledger"]
CMD ["serve"]
