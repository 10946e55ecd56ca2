# One image for the web server and the worker.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# libgomp: OpenMP runtime used by FAISS and torch.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives a small CPU-only torch.
ARG TORCH_INDEX_URL=""
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL} -r requirements.txt
COPY . .
RUN useradd --create-home --uid 1000 portal && mkdir -p /data && chown portal /data
USER portal
ENV PORTAL_STATE_DIR=/data MEDIA_ROOT=/data/media INDEX_DIR=/data/indices STATIC_ROOT=/app/staticfiles \
    HF_HOME=/data/hf
EXPOSE 8000
CMD ["gunicorn", "portal.wsgi", "-c", "python:portal.gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4", "--timeout", "120"]
