# The gateway in a container. With no REDIS_URL it runs its embedded redis-server (data in /data).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY lua ./lua
COPY config ./config
RUN pip install --no-cache-dir . && useradd --create-home gateway && mkdir /data && chown gateway /data
USER gateway
ENV GATEWAY_CONFIG_DIR=/app/config GATEWAY_DATA_DIR=/data
EXPOSE 8080
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]
