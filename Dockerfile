# syntax=docker/dockerfile:1
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /historyproxy .

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /historyproxy /historyproxy
# The admin listener must be reachable from outside the container for
# Prometheus; the default (127.0.0.1:9090) is for bare-metal sidecars.
ENV HISTORYPROXY_LISTEN=:8080 HISTORYPROXY_ADMIN_LISTEN=:9090
EXPOSE 8080 9090
USER nonroot:nonroot
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 CMD ["/historyproxy", "healthcheck"]
ENTRYPOINT ["/historyproxy"]
