# CI only: Label Studio built here, standing in for heartexlabs/label-studio on machines that reach
# no image registry (.ci/docker.sh). Like the official image: data in /label-studio/data (a volume,
# owned by uid 1001), port 8080, configured by Label Studio's own environment variables.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG LS_VERSION=1.23.2
RUN python -m venv /opt/label-studio \
    && /opt/label-studio/bin/pip install --no-cache-dir --disable-pip-version-check \
        "label-studio==${LS_VERSION}" \
    && useradd --uid 1001 --create-home --home-dir /label-studio --shell /usr/sbin/nologin labelstudio \
    && mkdir -p /label-studio/data && chown -R 1001 /label-studio
ENV PATH=/opt/label-studio/bin:$PATH \
    LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data \
    PYTHONUNBUFFERED=1
WORKDIR /label-studio
VOLUME ["/label-studio/data"]
USER 1001
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "--port", "8080"]
