# ensemble-serve for CUDA machines, on a pinned vLLM image (its CUDA torch and vLLM 0.32.0).
#   docker build -t ensemble-serve .
#   docker run --gpus all -p 8000:8000 -v $PWD/runs/population:/population ensemble-serve \
#       --population /population --served-model-name my-ensemble
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ensemble_serve ./ensemble_serve
COPY trainer ./trainer
COPY clients ./clients
COPY configs ./configs
# vLLM and its CUDA torch come from the base image and satisfy the package's requirements as they are;
# pip adds only what the image lacks (RE2, the embedding model, ...). No engine extra: the image is the engine.
RUN pip install --no-cache-dir ".[embed]" \
    && useradd --create-home --uid 10001 ensemble \
    && mkdir -p /population && chown ensemble /population

USER ensemble
ENV HF_HUB_OFFLINE=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"
ENTRYPOINT ["ensemble-serve", "up", "--host", "0.0.0.0", "--port", "8000", "--gpu-memory-utilization", "0.9"]
