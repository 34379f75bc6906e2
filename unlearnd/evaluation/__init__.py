"""Offline evaluation: the model under test, TOFU metrics, robustness probes, continual requests, the
detector evaluation and the report writer every evaluation shares."""
