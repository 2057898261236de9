"""The operator's side: the admin HTTP endpoint (`http`), Prometheus `metrics`, `readiness`."""
