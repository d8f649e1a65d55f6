# One image for the worker, the model server and the migrations (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app

# torch first, pinned, from the CPU index: left to the model extra, pip would
# resolve it from PyPI to a CUDA build several GB large. Its own layer, so
# code changes do not reinstall it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY inferstream ./inferstream
COPY schemas ./schemas
COPY streams ./streams
COPY bridges ./bridges
COPY tables ./tables
COPY workers ./workers
COPY modelserver ./modelserver
RUN pip install '.[model]'

RUN useradd --create-home --uid 10001 inferstream \
    && mkdir -p /var/lib/inferstream && chown inferstream /var/lib/inferstream
USER inferstream
# A prefix: the worker makes <prefix>-<namespace>-<port> with a plain mkdir, so it must lie inside a
# directory the user owns, not beside it in /var/lib.
ENV INFERSTREAM_DATA_DIR=/var/lib/inferstream/data

EXPOSE 6066 8000
CMD ["faust", "-A", "streams", "worker", "-l", "info"]
