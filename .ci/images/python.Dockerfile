# CI only: a stand-in for python:3.11-slim-bookworm on machines that reach no image registry.
# .ci/docker.sh imports a debootstrapped Debian bookworm (python3 and its headers, venv, pip, ca-certificates) as
# BASE_IMAGE and builds this on top, with the host's extra CA certificates in the context: these
# machines reach PyPI through a proxy that re-signs TLS, and pip inside a container refuses it
# ("self-signed certificate in certificate chain") until the container trusts the same CAs. None of
# this belongs to the product's Dockerfile, which starts FROM the official python image.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY ca-certificates/ /usr/local/share/ca-certificates/
# `python` as in the official image; pip may install into the system Python (the official image's
# Python is its own, without Debian's PEP 668 marker)
RUN ln -sf /usr/bin/python3 /usr/local/bin/python \
    && rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED \
    && update-ca-certificates
ENV LANG=C.UTF-8
CMD ["python3"]
