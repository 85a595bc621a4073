"""Running the service: structured, redacted logs (``logs``), lifecycle events
(``events``), the worker that processes them (``event_worker``) and webhook delivery
(``webhooks``)."""
