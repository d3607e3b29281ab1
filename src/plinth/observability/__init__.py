"""Observability: Prometheus metrics now; OpenTelemetry traces later."""
