# qwenlm: the OpenAI-compatible server and web chat for Qwen (v1) chat models on an NVIDIA GPU.
#   docker build -t qwenlm .
#   docker run --gpus all -p 8000:8000 -v /path/to/Qwen-7B-Chat:/model qwenlm
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch's CUDA 12.4 wheels (they carry their own CUDA libraries; the base image gives the driver glue)
RUN pip install torch --index-url https://download.pytorch.org/whl/cu124

WORKDIR /opt/qwenlm
COPY pyproject.toml README.md ./
COPY qwenlm ./qwenlm
RUN pip install .

EXPOSE 8000
# Mount the checkpoint folder at /model, or override the command.
CMD ["qwenlm", "serve", "--model", "/model", "--host", "0.0.0.0", "--port", "8000"]
